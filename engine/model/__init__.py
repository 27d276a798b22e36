"""The engine's model: a Llama-family decoder (Llama, Mistral, Qwen2 layouts) in llama.py, its
config in config.py (torch-free: specs use it), and its exact correspondence with Hugging Face's
in hf_names.py."""
