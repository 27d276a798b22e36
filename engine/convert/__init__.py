"""Conversion between Hugging Face model folders and native checkpoints (DESIGN.md §4 Interop),
every result checked against its source by logits before it appears under its final name."""
