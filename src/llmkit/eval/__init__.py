"""Evaluation harness (`llmkit eval`): multiple choice by log-likelihood (MMLU, C-Eval, CMMLU, ARC,
HellaSwag layouts), generative GSM8K with answer extraction, perplexity and bits per byte; batched,
cached per example, results as JSON and MLflow metrics. See docs/eval.md."""
