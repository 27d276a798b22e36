"""Our parameter names <-> Hugging Face Llama / Mistral / Qwen2 names, and whole state dicts
converted both ways. The tensors are passed through untouched, so the two directions are exact
inverses (bitwise)."""

from __future__ import annotations

import re

import torch

from engine.errors import InputError
from engine.model.llama import LlamaModel

_TOP = {"embed": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}
_IN_LAYER = {
    "attn_norm": "input_layernorm",
    "attn.wq": "self_attn.q_proj",
    "attn.wk": "self_attn.k_proj",
    "attn.wv": "self_attn.v_proj",
    "attn.wo": "self_attn.o_proj",
    "mlp_norm": "post_attention_layernorm",
    "mlp.w_gate": "mlp.gate_proj",
    "mlp.w_up": "mlp.up_proj",
    "mlp.w_down": "mlp.down_proj",
}
_TOP_BACK = {hf: ours for ours, hf in _TOP.items()}
_IN_LAYER_BACK = {hf: ours for ours, hf in _IN_LAYER.items()}
_OURS = re.compile(r"layers\.(\d+)\.(.+)")
_HF = re.compile(r"model\.layers\.(\d+)\.(.+)")


def to_hf_name(name: str) -> str:
    """`layers.3.attn.wq.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    module, _, kind = name.rpartition(".")
    if module in _TOP:
        return f"{_TOP[module]}.{kind}"
    match = _OURS.fullmatch(module)
    if match and match[2] in _IN_LAYER:
        return f"model.layers.{match[1]}.{_IN_LAYER[match[2]]}.{kind}"
    raise KeyError(f"no HF name for parameter {name!r}")


def from_hf_name(name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `layers.3.attn.wq.weight`."""
    module, _, kind = name.rpartition(".")
    if module in _TOP_BACK:
        return f"{_TOP_BACK[module]}.{kind}"
    match = _HF.fullmatch(module)
    if match and match[2] in _IN_LAYER_BACK:
        return f"layers.{match[1]}.{_IN_LAYER_BACK[match[2]]}.{kind}"
    raise KeyError(f"no parameter for HF tensor {name!r}")


def to_hf_state_dict(model: LlamaModel) -> dict[str, torch.Tensor]:
    """HF-named tensors (shared with the model). A tied head has no `lm_head.weight`, as in
    HF's safetensors files."""
    return {to_hf_name(name): tensor for name, tensor in model.state_dict().items()}


def load_hf_state_dict(model: LlamaModel, hf_state: dict[str, torch.Tensor]) -> None:
    """Load HF-named tensors into the model: copied into materialised parameters (cast to their
    dtype), or assigned as they are into a meta-device model. Every parameter must be given and
    every tensor used."""
    tied = model.cfg.tie_word_embeddings
    state, unknown = {}, []
    for hf_name, tensor in hf_state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # computed, not learned; old checkpoints stored it
        if tied and hf_name == "lm_head.weight":
            embed = hf_state.get("model.embed_tokens.weight")
            if embed is not None and not torch.equal(tensor, embed):
                raise InputError("config ties the embeddings but lm_head.weight differs from "
                                 "model.embed_tokens.weight")
            continue
        try:
            state[from_hf_name(hf_name)] = tensor
        except KeyError:
            unknown.append(hf_name)
    expected = model.state_dict()
    missing = sorted(to_hf_name(name) for name in set(expected) - set(state))
    unknown += sorted(to_hf_name(name) for name in set(state) - set(expected))
    problems = [f"{kind} tensors {_some(names)}"
                for kind, names in (("missing", missing), ("unexpected", unknown)) if names]
    if problems:
        raise InputError(f"does not fit the model config: {'; '.join(problems)}")
    wrong = [f"{to_hf_name(n)} {tuple(t.shape)} (expected {tuple(expected[n].shape)})"
             for n, t in state.items() if t.shape != expected[n].shape]
    if wrong:
        raise InputError(f"HF tensors of the wrong shape: {'; '.join(wrong)}")
    on_meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(state, strict=True, assign=on_meta)


def _some(names: list[str], shown: int = 5) -> str:
    """The first names of a list that may be as long as a model's (a config of another model)."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
