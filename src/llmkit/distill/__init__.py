"""Knowledge distillation (guide §5): a smaller student trained on a teacher's distributions.

`recipe.distill` is the stage (`llmkit distill --config configs/distill_*.yaml`); `losses` holds the
divergences, `teacher_cache` the teacher's top-k logits cached by content, `student` the student's start
(layers dropped, width pruned by activation importance, a smaller config), `sequence_level` the teacher's own
answers, `on_policy` batches of the student's own sampled replies scored by the teacher live (GKD).
"""
