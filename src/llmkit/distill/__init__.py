"""Knowledge distillation (guide §5): a smaller student trained on a teacher's distributions.

`recipe.distill` is the stage (`llmkit distill --config configs/distill_*.yaml`); `losses` holds the
divergences, `teacher_cache` the teacher's top-k logits cached by content, `student` the student's start.
"""
