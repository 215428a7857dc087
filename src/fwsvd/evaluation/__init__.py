"""Evaluation: task metrics, perplexity and zero-shot accuracy."""
