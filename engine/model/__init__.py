"""The engine's model: a Llama-family decoder (Llama, Mistral, Qwen2 layouts), its config, and
its exact correspondence with Hugging Face's."""

from engine.model.config import ModelConfig
from engine.model.generate import generate_greedy
from engine.model.hf_names import load_hf_state_dict, to_hf_state_dict
from engine.model.llama import LlamaModel

__all__ = ["LlamaModel", "ModelConfig", "generate_greedy", "load_hf_state_dict",
           "to_hf_state_dict"]
