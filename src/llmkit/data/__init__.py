"""The data stage (guide §1.1): sample corpora, the cleaning / dedup / filtering / mixing / augmentation
pipeline (`llmkit data run`), and token shards for pretraining."""
