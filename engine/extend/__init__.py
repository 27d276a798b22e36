"""The extend stage: a model's context extended without training (docs/training.md)."""
