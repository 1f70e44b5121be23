"""Serving a model: the scoring core, the champion, hot swaps and batch scoring."""
