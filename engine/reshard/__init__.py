"""The reshard stage: a native checkpoint rewritten for another training layout, with or without
its optimizer state, or consolidated into one safetensors file (docs/reshard.md)."""
