"""The whole lifecycle as one resumable, skip-what-is-unchanged pipeline (guide §4).

`llmkit pipeline run configs/quickstart.yaml` runs samples -> data -> tokenizer -> tokens -> pretrain ->
sft -> merge -> quantize -> eval -> register; `llmkit report RUN_DIR` draws the monitoring page.
"""
