"""Evaluation suites (perplexity, FinEval, LAMBADA, WikiText) over one batched, data-parallel
scoring loop, and the reports they write (docs/evaluate.md)."""
