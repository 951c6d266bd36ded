"""Evaluators: zero-shot retrieval (this package), detection AP later."""
