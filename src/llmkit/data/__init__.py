"""Data sources: the sample corpora (`llmkit.data.samples`) and their readers."""
