"""The engine's model against Hugging Face transformers (random tiny models of every supported
layout and RoPE variant, and the real trained stories260K), plus its build/init/conversion
contracts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import random_hf_model
import torch
from pydantic import ValidationError

from engine.errors import InputError, SpecError
from engine.model.config import ModelConfig
from engine.model.hf_names import from_hf_name, load_hf_state_dict, to_hf_name, to_hf_state_dict
from engine.model.llama import LlamaModel
from engine.model.rope import inverse_frequencies

transformers = pytest.importorskip("transformers")

TINY_LLAMA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny-llama"
SEQ = 48
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
            num_kv_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
LLAMA3 = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}

CASES = {
    "llama-gqa": {},
    "llama-mha-tied": dict(num_kv_heads=4, tie_word_embeddings=True),
    "llama-linear": dict(rope_scaling={"type": "linear", "factor": 2.0}),
    # max positions below the batch's length, so the NTK base really grows
    "llama-dynamic": dict(max_position_embeddings=32,
                          rope_scaling={"type": "dynamic", "factor": 2.0}),
    "llama-yarn": dict(max_position_embeddings=128, rope_scaling={
        "type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}),
    "llama-yarn-mscale": dict(max_position_embeddings=256, rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 0.707,
        "mscale_all_dim": 1.0, "beta_fast": 16.0, "truncate": False}),
    "llama-llama3": dict(max_position_embeddings=512, rope_scaling=LLAMA3),
    "qwen2-bias-tied": dict(family="qwen2", tie_word_embeddings=True),
    "qwen2-yarn-mha": dict(family="qwen2", num_kv_heads=4, max_position_embeddings=128,
                           rope_scaling={"type": "yarn", "factor": 2.0, "attention_factor": 1.3,
                                         "original_max_position_embeddings": 64}),
    "mistral-head-dim-32": dict(family="mistral", head_dim=32, rope_theta=500000.0),
}


def config(case: str, **extra) -> ModelConfig:
    return ModelConfig(**{**BASE, **CASES[case], **extra})


def batch(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", CASES)
def test_logits_match_hf(case: str):
    cfg = config(case)
    hf = random_hf_model(cfg)
    ours = LlamaModel(cfg)
    load_hf_state_dict(ours, hf.state_dict())
    ids = batch(cfg.vocab_size)
    with torch.no_grad():
        expected = hf(ids, use_cache=False).logits
        got = ours(ids)
        eager = LlamaModel(config(case, attention_backend="eager"))
        load_hf_state_dict(eager, hf.state_dict())
        got_eager = eager(ids)
    assert expected.abs().max() > 0.5  # not a degenerate model
    assert (got - expected).abs().max().item() <= 1e-5
    assert (got_eager - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", [c for c in CASES if "rope_scaling" in CASES[c]])
@pytest.mark.parametrize("length", [SEQ, 8])
def test_rope_frequencies_equal_hf(case: str, length: int):
    """Bitwise the same inverse frequencies and attention factor as transformers' definitions
    (for dynamic NTK, both beyond and within the trained length)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = config(case)
    hf_cfg = dict(cfg.to_hf())
    hf_config = transformers.AutoConfig.for_model(hf_cfg.pop("model_type"), **hf_cfg)
    hf_fn = ROPE_INIT_FUNCTIONS[cfg.rope_scaling.type]
    seq_len = torch.tensor(length)
    hf_inv, hf_scale = hf_fn(hf_config, None, seq_len=seq_len)
    inv, scale = inverse_frequencies(cfg, None, seq_len)
    assert torch.equal(inv, hf_inv.float()) and scale == hf_scale


@pytest.mark.parametrize("case", CASES)
def test_config_round_trips_through_hf(case: str):
    """Our export, loaded by transformers and saved again (5.x `rope_parameters` form), reads
    back as the same config."""
    cfg = config(case)
    hf_cfg = dict(cfg.to_hf())
    hf_config = transformers.AutoConfig.for_model(hf_cfg.pop("model_type"), **hf_cfg)
    saved = hf_config.to_dict()
    assert "rope_parameters" in saved
    assert ModelConfig.from_hf(saved) == cfg
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_state_dict_round_trip_is_bitwise_and_uses_hf_names():
    for case in ("qwen2-bias-tied", "llama-gqa"):
        cfg = config(case)
        source = LlamaModel(cfg)
        source.init_weights(seed=3)
        hf_state = to_hf_state_dict(source)
        expected_names = set(random_hf_model(cfg).state_dict()) - (
            {"lm_head.weight"} if cfg.tie_word_embeddings else set())
        assert set(hf_state) == expected_names
        with torch.device("meta"):
            target = LlamaModel(cfg)
        load_hf_state_dict(target, hf_state)
        for name, tensor in source.state_dict().items():
            loaded = target.state_dict()[name]
            assert loaded.dtype == tensor.dtype and torch.equal(loaded, tensor), name
        assert all(torch.equal(hf_state[k], v) for k, v in to_hf_state_dict(target).items())
    assert from_hf_name(to_hf_name("layers.7.mlp.w_gate.weight")) == "layers.7.mlp.w_gate.weight"
    assert to_hf_name("layers.1.attn.wq.bias") == "model.layers.1.self_attn.q_proj.bias"


def test_load_rejects_state_dict_of_another_shape():
    hf_state = to_hf_state_dict(LlamaModel(config("qwen2-bias-tied")))
    with pytest.raises(InputError, match="unexpected .*q_proj.bias"):
        load_hf_state_dict(LlamaModel(config("llama-gqa", tie_word_embeddings=True)), hf_state)
    with pytest.raises(InputError, match="missing .*lm_head.weight"):
        load_hf_state_dict(LlamaModel(config("qwen2-bias-tied", tie_word_embeddings=False,
                                             family="qwen2")), hf_state)


def test_meta_build_and_seeded_init_are_deterministic():
    cfg = config("qwen2-bias-tied")
    with torch.device("meta"):
        meta_built = LlamaModel(cfg)
    with pytest.raises(RuntimeError, match="to_empty"):
        meta_built.init_weights(seed=5)
    meta_built.to_empty(device="cpu")
    meta_built.init_weights(seed=5)
    direct = LlamaModel(cfg)
    direct.init_weights(seed=5)
    other_seed = LlamaModel(cfg)
    other_seed.init_weights(seed=6)
    deeper = LlamaModel(config("qwen2-bias-tied", num_layers=3))
    deeper.init_weights(seed=5)
    for name, tensor in direct.state_dict().items():
        assert torch.equal(meta_built.state_dict()[name], tensor), name
        if name.startswith("layers.0.") and name.endswith("proj.weight"):
            assert not torch.equal(other_seed.state_dict()[name], tensor), name
    # A weight depends on the seed and its own name only: layers stay the same however many
    # others the model (or a pipeline stage) holds.
    assert torch.equal(deeper.state_dict()["layers.1.attn.wq.weight"],
                       direct.state_dict()["layers.1.attn.wq.weight"])
    assert direct.state_dict()["layers.0.attn.wq.bias"].abs().sum() == 0
    assert torch.equal(direct.state_dict()["norm.weight"], torch.ones(cfg.hidden_size))
    std = direct.state_dict()["layers.0.mlp.w_up.weight"].std().item()
    assert abs(std - cfg.init_std) < 0.002


def test_init_ignores_wrappers():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    cfg = config("llama-gqa")
    plain, wrapped = LlamaModel(cfg), LlamaModel(cfg)
    wrapped.layers["1"] = checkpoint_wrapper(wrapped.layers["1"])
    plain.init_weights(seed=2)
    wrapped.init_weights(seed=2)
    ids = batch(cfg.vocab_size)
    with torch.no_grad():
        assert torch.equal(plain(ids), wrapped(ids))


def test_position_ids_and_hidden_path():
    cfg = config("llama-gqa")
    model = LlamaModel(cfg)
    model.init_weights(seed=1)
    ids = batch(cfg.vocab_size)
    with torch.no_grad():
        logits = model(ids)
        shifted = model(ids, position_ids=torch.arange(10, 10 + SEQ)[None])
        hidden = model.forward_hidden(ids)
    assert logits.shape == (2, SEQ, cfg.vocab_size)
    assert torch.equal(model.logits(hidden), logits)
    assert not torch.allclose(shifted, logits)


def test_config_errors_are_clear():
    with pytest.raises(ValidationError, match="dropout") as err:
        ModelConfig(**BASE, dropout=0.1)
    assert "Extra inputs are not permitted" in str(err.value)
    with pytest.raises(ValidationError, match="multiple of num_kv_heads"):
        ModelConfig(**{**BASE, "num_kv_heads": 3})
    with pytest.raises(ValidationError, match="not divisible by num_heads"):
        ModelConfig(**{**BASE, "hidden_size": 66})
    with pytest.raises(ValidationError, match="only qwen2 has q/k/v biases"):
        ModelConfig(**BASE, qkv_bias=True)
    with pytest.raises(ValidationError, match="rope_scaling.yarn.original_max_position_emb"):
        ModelConfig(**BASE, rope_scaling={"type": "yarn", "factor": 2.0})
    with pytest.raises(ValidationError, match="rope_scaling.linear.beta_fast"):
        ModelConfig(**BASE, rope_scaling={"type": "linear", "factor": 2.0, "beta_fast": 4})
    with pytest.raises(ValidationError, match="rms_norm_eps\n.*finite number"):
        ModelConfig(**{**BASE, "rms_norm_eps": float("nan")})
    with pytest.raises(ValidationError, match="rope_scaling.linear.factor\n.*finite number"):
        ModelConfig(**BASE, rope_scaling={"type": "linear", "factor": float("inf")})


def test_from_hf_errors_name_the_problem():
    hf = config("llama-gqa").to_hf()
    with pytest.raises(InputError, match=r"unsupported HF architecture 'GPT2LMHeadModel' "
                                         r"\(supported: Llama, Mistral, Qwen2\)"):
        ModelConfig.from_hf({**hf, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    with pytest.raises(InputError, match="sliding-window"):
        ModelConfig.from_hf({**config("mistral-head-dim-32").to_hf(), "sliding_window": 16})
    with pytest.raises(InputError, match="attention_bias"):
        ModelConfig.from_hf({**hf, "attention_bias": True})
    with pytest.raises(InputError, match="unsupported RoPE type 'longrope'"):
        ModelConfig.from_hf({**hf, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}})
    with pytest.raises(InputError, match="lacks vocab_size"):
        ModelConfig.from_hf({k: v for k, v in hf.items() if k != "vocab_size"})
    # values are reported under config.json's names, one line for all
    with pytest.raises(InputError, match=r"^num_hidden_layers: Input should be greater than 0; "
                                         r"rope_theta: Input should be a finite number$"):
        ModelConfig.from_hf({**hf, "num_hidden_layers": 0,
                             "rope_parameters": {**hf["rope_parameters"], "rope_theta": float("inf")}})


@pytest.mark.parametrize("backend,module,package", [("flash_attn", "flash_attn", "flash-attn"),
                                                     ("flash_attn_4", "flash_attn.cute", "flash-attn-4")])
def test_unavailable_backend_says_what_to_install(backend, module, package):
    try:
        __import__(module)
        pytest.skip(f"{package} is installed here")
    except ImportError:
        pass
    with pytest.raises(SpecError, match=rf"needs the {package} package \(pip install \.\[gpu\]\)"):
        LlamaModel(config("llama-gqa", attention_backend=backend))


def test_flash_attn_4_refuses_head_dims_its_kernels_lack():
    """flash-attn-4 on Hopper takes head_dim 8..256 in steps of 8 (the 3B shape's 100 is not):
    refused with the model config, so before any job is submitted."""
    with pytest.raises(ValidationError, match=r"flash_attn_4' needs head_dim a multiple of 8 .* not 100"):
        config("llama-gqa", hidden_size=400, head_dim=100, attention_backend="flash_attn_4")
    assert config("llama-gqa", hidden_size=400, head_dim=100).head_dim == 100  # sdpa takes it


@pytest.fixture(scope="module")
def stories260k():
    if not (TINY_LLAMA / "hf" / "model.safetensors").exists():
        pytest.skip(f"stories260K test material not found under {TINY_LLAMA}")
    from safetensors.torch import load_file

    hf_dir = TINY_LLAMA / "hf"
    model = LlamaModel(ModelConfig.from_hf(json.loads((hf_dir / "config.json").read_text())))
    load_hf_state_dict(model, load_file(hf_dir / "model.safetensors"))
    reference = json.loads((TINY_LLAMA / "reference_outputs.json").read_text())
    return model.eval(), hf_dir, reference


def test_stories260k_logits_match_hf(stories260k):
    model, hf_dir, reference = stories260k
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor([reference["greedy_from_bos"]["ids"]])  # 257 real tokens
    with torch.no_grad():
        diff = (model(ids) - hf(ids, use_cache=False).logits).abs().max().item()
    assert diff <= 1e-4  # fp32 rounding: our fused gate/up GEMM reduces in another order


def test_stories260k_greedy_and_nll_match_llama2c(stories260k):
    model, _, reference = stories260k
    greedy = reference["greedy_from_bos"]
    from engine.data.tokenizer import load_tokenizer
    from engine.generate.generator import Generator
    from engine.generate.params import SamplingParams

    generator = Generator(model, load_tokenizer(TINY_LLAMA / "hf"), torch.device("cpu"),
                          progress=False)
    params = SamplingParams(temperature=0, max_tokens=greedy["max_new_tokens"], ignore_eos=True)
    (out,), = generator.generate([greedy["prompt_ids"]], params)
    assert greedy["prompt_ids"] + out.token_ids == greedy["ids"]
    ids = torch.tensor([reference["nll_example"]["ids_with_bos"]])
    with torch.no_grad():
        logprobs = model(ids)[0, :-1].double().log_softmax(-1)
    nll = -logprobs.gather(-1, ids[0, 1:, None]).mean().item()
    assert nll == pytest.approx(reference["nll_example"]["mean_nll_nats"], abs=1e-5)


@pytest.mark.parametrize("width", [192, 172])  # blocks of 64; 172 falls back to blocks of 4
def test_swiglu_interleaved_gemm_equals_plain(width):
    """The gate/up GEMM over interleaved blocks of weight rows gives the plain
    w_down(silu(w_gate x) * w_up x) and its gradients, eager and compiled."""
    from engine.model.llama import SwiGLU

    cfg = ModelConfig(**{**BASE, "intermediate_size": width})
    torch.manual_seed(0)
    mlp = SwiGLU(cfg)
    x = torch.randn(3, 5, cfg.hidden_size, requires_grad=True)

    def run(forward):
        x.grad = None
        mlp.zero_grad()
        out = forward(x)
        out.square().sum().backward()
        return [out.detach(), x.grad] + [p.grad for p in mlp.parameters()]

    plain = run(lambda v: mlp.w_down(torch.nn.functional.silu(mlp.w_gate(v)) * mlp.w_up(v)))
    for forward in (mlp, torch.compile(mlp)):
        for got, want in zip(run(forward), plain):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,residual", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
def test_autocast_residual_stream_dtype(dtype, residual):
    """Under bf16 autocast the residual stream and the norms' outputs are bf16 (Megatron's bf16),
    as with bf16 weights; fp16 keeps the residual stream in fp32. Weights stay fp32."""
    cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=64)
    model = LlamaModel(cfg)
    model.init_weights(0)
    seen = {}
    model.layers["1"].register_forward_pre_hook(lambda m, args: seen.update(block=args[0].dtype))
    model.norm.register_forward_hook(lambda m, args, out: seen.update(norm=out.dtype))
    ids = torch.randint(0, 97, (2, 9))
    with torch.autocast("cpu", dtype=dtype):
        loss = model(ids[:, :-1], targets=ids[:, 1:])
    loss.backward()
    assert seen == {"block": residual, "norm": residual}
    assert loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    bf16 = LlamaModel(cfg)
    bf16.load_state_dict(model.state_dict())
    bf16.to(dtype)
    if dtype == torch.bfloat16:  # the same rounding points as pure bf16 weights, up to the weights' own rounding
        pure = bf16(ids[:, :-1], targets=ids[:, 1:])
        assert abs(pure.item() - loss.item()) / loss.item() < 2e-2


def test_training_steps_equal_hf():
    """Ten AdamW steps from the same weights on the same batch: our fused loss path and HF's
    model with the same cross-entropy give the same losses and weights (fp32)."""
    import torch.nn.functional as F

    cfg = config("llama-gqa")
    hf = random_hf_model(cfg).train()
    ours = LlamaModel(cfg)
    load_hf_state_dict(ours, hf.state_dict())
    ids = batch(cfg.vocab_size, seed=3)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    losses = {}
    for name, model in (("ours", ours), ("hf", hf)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses[name] = []
        for _ in range(10):
            if name == "ours":
                loss = model(inputs, targets=targets) / targets.numel()
            else:
                logits = model(inputs, use_cache=False).logits
                loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    assert losses["ours"][-1] < losses["ours"][0] - 0.5  # it learns
    assert max(abs(a - b) for a, b in zip(losses["ours"], losses["hf"])) < 1e-5, losses
    hf_state = hf.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.allclose(tensor, hf_state[to_hf_name(name)], atol=1e-4), name
