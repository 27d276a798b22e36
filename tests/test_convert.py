"""The convert stage: HF <-> native round trips are bitwise, outputs load in transformers
unchanged (shards, rope scaling, reduced dtypes), the logit verification catches a tampered
weight and leaves nothing behind, and bad inputs say what is wrong."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import random_hf_model
import torch
from safetensors.torch import load_file, save_file

from engine.convert import hf as hf_io
from engine.convert.spec import Spec
from engine.convert.stage import run
from engine.convert.verify import VerificationError
from engine.errors import InputError
from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel
from engine.checkpoint.store import save_checkpoint

transformers = pytest.importorskip("transformers")

STORIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny-llama" / "hf"
TOKENIZER_FILES = ["generation_config.json", "special_tokens_map.json", "tokenizer.json",
                   "tokenizer.model", "tokenizer_config.json"]
SAFE = "model.safetensors"
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
            num_kv_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def stories() -> Path:
    if not (STORIES / "model.safetensors").is_file():
        pytest.skip(f"stories260K test material not found under {STORIES}")
    return STORIES


def convert(src: Path, dst: Path, source: str, target: str, **fields):
    return run(Spec(load_dir=str(src), save_dir=str(dst), source_format=source,
                    target_format=target, **fields))


def hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(ids, use_cache=False).logits


def ids_for(vocab: int, seq: int = 48) -> torch.Tensor:
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(7))


def test_stories260k_hf_native_hf_is_bitwise(stories, tmp_path):
    native = convert(stories, tmp_path / "native", "hf", "native")
    assert native.kind == "checkpoint"
    assert (tmp_path / "native" / "iter_0000000" / "meta.json").is_file()
    assert (tmp_path / "native" / "latest_checkpointed_iteration.txt").read_text() == "0\n"
    assert sorted(p.name for p in (tmp_path / "native" / "tokenizer").iterdir()) == TOKENIZER_FILES
    back = convert(tmp_path / "native", tmp_path / "hf", "native", "hf")
    assert back.kind == "hf-model" and back.summary["dtype"] == "fp32"

    original, result = load_file(stories / "model.safetensors"), load_file(tmp_path / "hf" / SAFE)
    assert original.keys() == result.keys()  # tied: no lm_head.weight on either side
    for name, tensor in original.items():
        assert torch.equal(tensor, result[name]), name
    for name in TOKENIZER_FILES:
        assert (tmp_path / "hf" / name).read_bytes() == (stories / name).read_bytes()
    config = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert (config.bos_token_id, config.eos_token_id, config.tie_word_embeddings) == (1, 2, True)

    for manifest in (native, back):
        check = manifest.summary["verification"]
        # fp32 rounding only: our fused gate/up GEMM reduces in another order than HF's
        assert check["max_abs_diff"] <= 5e-5 and check["mean_abs_diff"] <= 5e-6
        assert check["tolerance_max_abs"] == 1e-4 and check["batch"] == [2, 64]
    assert native.summary["verification"]["reference"]["source"].startswith("transformers")
    assert back.summary["verification"]["reference"] == {
        "source": "lmforge LlamaModel",
        "result": f"transformers {transformers.__version__} AutoModelForCausalLM"}
    manifest = json.loads((tmp_path / "hf" / "manifest.json").read_text())
    assert set(manifest["files"]) == set(TOKENIZER_FILES) | {"config.json", SAFE}


def test_fp16_output_is_the_source_rounded(stories, tmp_path):
    manifest = convert(stories, tmp_path / "out", "hf", "hf", dtype="fp16")
    result = load_file(tmp_path / "out" / SAFE)
    for name, tensor in load_file(stories / SAFE).items():
        assert result[name].dtype == torch.float16
        assert torch.equal(result[name], tensor.half()), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float16"
    check = manifest.summary["verification"]
    assert check["source_rounded_to"] == "float16" and check["max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_bin_source_to_three_safetensors_shards(tmp_path, layout):
    cfg = ModelConfig(**BASE)
    model = random_hf_model(cfg)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(cfg.to_hf()))
    state = model.state_dict()
    if layout == "single":
        torch.save(state, src / "pytorch_model.bin")
    else:
        names = list(state)
        parts = {"pytorch_model-00001-of-00002.bin": names[:7],
                 "pytorch_model-00002-of-00002.bin": names[7:]}
        for file, part in parts.items():
            torch.save({n: state[n] for n in part}, src / file)
    sizes = [t.numel() * t.element_size() for t in state.values()]
    if layout == "sharded":
        (src / "pytorch_model.bin.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(sizes)},
             "weight_map": {n: file for file, part in parts.items() for n in part}}))
    assert sum(sizes) == 312_576  # 120 kB per shard: 3 shards (HF's rule: kB = 1000 bytes)
    manifest = convert(src, tmp_path / "out", "hf", "hf", max_shard_size="120KB")
    out = tmp_path / "out"
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert manifest.summary["weight_files"] == shards and not (out / SAFE).exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(sizes)
    assert set(index["weight_map"]) == set(state)
    for shard in shards:
        tensors = load_file(out / shard)
        assert {n for n, f in index["weight_map"].items() if f == shard} == set(tensors)
        for name, tensor in tensors.items():
            assert torch.equal(tensor, state[name]), name
    ids = ids_for(cfg.vocab_size)
    with torch.no_grad():
        assert torch.allclose(hf_logits(out, ids), model(ids).logits, atol=1e-5, rtol=0)
    assert manifest.summary["verification"]["max_abs_diff"] <= 1e-5
    back = convert(out, tmp_path / "native", "hf", "native")  # sharded safetensors as a source
    assert back.summary["verification"]["max_abs_diff"] <= 1e-5


@pytest.mark.parametrize("scaling", [
    {"type": "linear", "factor": 4.0},
    {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
])
def test_rope_scaling_survives_native_to_hf(tmp_path, scaling):
    cfg = ModelConfig(**BASE, rope_scaling=scaling)
    model = LlamaModel(cfg)
    model.init_weights(seed=3)
    save_checkpoint(tmp_path / "native", 0, model, None, {}, cfg.model_dump(mode="json"))

    manifest = convert(tmp_path / "native", tmp_path / "hf", "native", "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    for form in (written["rope_scaling"], written["rope_parameters"]):  # transformers 4.x, 5.x
        assert form["rope_type"] == scaling["type"] and form["factor"] == scaling["factor"]
    assert written["rope_parameters"]["rope_theta"] == cfg.rope_theta
    hf_config = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert ModelConfig.from_hf(hf_config.to_dict()) == cfg
    ids = ids_for(cfg.vocab_size, seq=64)
    with torch.no_grad():
        assert torch.allclose(hf_logits(tmp_path / "hf", ids), model(ids), atol=1e-5, rtol=0)
    assert manifest.summary["verification"]["max_abs_diff"] <= 1e-5


def test_tokenizer_for_a_checkpoint_that_has_none(stories, tmp_path):
    convert(stories, tmp_path / "native", "hf", "native")
    for file in (tmp_path / "native" / "tokenizer").iterdir():
        file.unlink()
    (tmp_path / "native" / "tokenizer").rmdir()  # as a training checkpoint: no tokenizer
    manifest = convert(tmp_path / "native", tmp_path / "hf", "native", "hf",
                       tokenizer=str(stories))
    assert sorted(manifest.summary["tokenizer_files"]) == TOKENIZER_FILES
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer("Once upon a time")["input_ids"][0] == 1


def test_occupied_output_fails_before_reading(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")  # would fail, but later
    with pytest.raises(InputError, match="output folder exists and is not empty"):
        convert(tmp_path / "src", tmp_path / "out", "hf", "hf")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("with_transformers", [True, False])
def test_tampered_weight_fails_and_leaves_nothing(stories, tmp_path, monkeypatch,
                                                  with_transformers):
    exact = hf_io.export_state_dict

    def tampered(model, dtype):
        state = exact(model, dtype)
        state["model.norm.weight"] = state["model.norm.weight"].clone()
        state["model.norm.weight"][0] += 1e-2
        return state

    monkeypatch.setattr(hf_io, "export_state_dict", tampered)
    if not with_transformers:
        monkeypatch.setitem(sys.modules, "transformers", None)  # import fails: our loader runs
    with pytest.raises(VerificationError, match=r"differ from the source's by up to .*nothing "
                                                r"was written"):
        convert(stories, tmp_path / "out", "hf", "hf")
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary folder


def test_without_transformers_our_loader_is_the_reference(stories, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    check = convert(stories, tmp_path / "out", "hf", "hf").summary["verification"]
    ours = "lmforge LlamaModel (transformers not importable)"
    assert check["reference"] == {"source": ours, "result": ours}
    assert check["max_abs_diff"] == 0.0


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="not a model checkpoint: neither an HF model folder"):
        convert(tmp_path / "src", tmp_path / "out", "hf", "native")
    with pytest.raises(InputError, match="not a model checkpoint"):
        convert(tmp_path / "src", tmp_path / "out", "native", "hf")
    assert not (tmp_path / "out").exists()


def test_wrong_source_format_names_the_right_one(stories, tmp_path):
    with pytest.raises(InputError, match="is an HF model folder.*use --source-format hf"):
        convert(stories, tmp_path / "out", "native", "hf")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps(
        {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 64}))
    with pytest.raises(InputError, match="unsupported HF architecture 'GPT2LMHeadModel'"):
        convert(tmp_path / "src", tmp_path / "out", "hf", "native")


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    cfg = ModelConfig(**BASE)
    model = LlamaModel(cfg)
    model.init_weights()
    state = {name: t.clone() for name, t in hf_io.export_state_dict(model, torch.float32).items()}
    state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg.to_hf()))
    save_file(state, tmp_path / "src" / SAFE, metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight "
                                         r"\(16, 64\) \(expected \(32, 64\)\)"):
        convert(tmp_path / "src", tmp_path / "out", "hf", "hf")
    assert not (tmp_path / "out").exists()


def test_damaged_index_and_bin_name_the_file(tmp_path):
    cfg = ModelConfig(**BASE)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg.to_hf()))
    (tmp_path / "src" / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not a zip archive")
    with pytest.raises(InputError, match=r"pytorch_model\.bin: not a loadable PyTorch weights "
                                         r"file \(truncated or corrupt\)"):
        hf_io.load_hf(tmp_path / "src")
    (tmp_path / "src" / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(InputError, match=r"model\.safetensors\.index\.json: not a JSON object"):
        hf_io.load_hf(tmp_path / "src")


def test_dtype_is_for_hf_and_megatron_output_only():
    with pytest.raises(ValueError, match="dtype applies to HF and Megatron output only"):
        Spec(load_dir="a", save_dir="b", source_format="hf", target_format="native", dtype="bf16")
