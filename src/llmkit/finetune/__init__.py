"""Fine-tuning recipes. `classify`: an encoder (BERT-style) with a classification head."""

from llmkit.finetune.classify import ClassifyConfig, finetune_classifier

__all__ = ["ClassifyConfig", "finetune_classifier"]
