"""Megatron-LM interop in the convert stage: per-rank checkpoints at TP 2 x PP 2, with
megatron-core or legacy GPT names, round-trip bitwise and by HF logits, virtual pipeline chunks
sit where Megatron-LM puts them and round-trip, every naming Megatron has used (megatron-core
local and TE, legacy GPT, EPFL Megatron-LLM) imports to the same logits, megatron-core 0.16.1
itself runs our exports and we run its torch_dist checkpoint, and bad inputs say what is
wrong."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from conftest import REPO, random_hf_model
from engine.convert.megatron_layout import padded_vocab
from engine.convert.megatron_pickle import load_pickled
from engine.convert.megatron_tensors import split, to_parts
from engine.convert.spec import Spec
from engine.convert.stage import run
from engine.convert.native import load_native
from engine.errors import InputError
from engine.model.config import ModelConfig
from engine.model.hf_names import load_hf_state_dict
from engine.model.llama import LlamaModel

transformers = pytest.importorskip("transformers")

# GQA, and a vocabulary that is no multiple of 128: the padding is exercised
CFG = ModelConfig(vocab_size=200, hidden_size=64, intermediate_size=96, num_layers=4,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=64)
IDS = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(3))


def convert(src: Path, dst: Path, source: str, target: str, **fields):
    return run(Spec(load_dir=str(src), save_dir=str(dst), source_format=source,
                    target_format=target, **fields))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "model"
    random_hf_model(CFG, seed=1).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(hf_folder) -> LlamaModel:
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    with torch.device("meta"):
        ours = LlamaModel(CFG)
    load_hf_state_dict(ours, hf.state_dict())
    return ours.eval()


def our_logits(model: LlamaModel) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def _round_trips(hf_folder: Path, tmp_path: Path, **layout):
    """HF -> Megatron -> HF: transformers computes the same logits, bit for bit; native ->
    Megatron -> native: the same bytes. Returns the HF -> Megatron manifest."""
    manifest = convert(hf_folder, tmp_path / "mg", "hf", "megatron", **layout)
    assert manifest.summary["verification"]["max_abs_diff"] <= 1e-5
    back = convert(tmp_path / "mg", tmp_path / "hf", "megatron", "hf")
    result = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf",
                                                               dtype=torch.float32)
    source = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(result(IDS).logits, source(IDS).logits)
    assert back.summary["verification"]["max_abs_diff"] <= 1e-5

    convert(hf_folder, tmp_path / "native", "hf", "native")
    convert(tmp_path / "native", tmp_path / "mg2", "native", "megatron", **layout)
    convert(tmp_path / "mg2", tmp_path / "native2", "megatron", "native")
    before, after = load_native(tmp_path / "native")[1], load_native(tmp_path / "native2")[1]
    for name, tensor in before.state_dict().items():
        assert torch.equal(tensor, after.state_dict()[name]), name
    return manifest


def test_tp2_pp2_round_trips_bitwise_and_by_hf_logits(hf_folder, tmp_path):
    manifest = _round_trips(hf_folder, tmp_path, tensor_parallel=2, pipeline_parallel=2)
    release = tmp_path / "mg" / "release"
    assert sorted(p.name for p in release.iterdir()) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    assert (tmp_path / "mg" / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert manifest.kind == "checkpoint"
    assert manifest.summary["megatron"]["padded_vocab_size"] == 256
    rank = load_pickled(release / "mp_rank_01_001" / "model_optim_rng.pt")
    args = vars(rank["args"])
    assert (args["padded_vocab_size"], args["vocab_size"]) == (256, 200)
    assert (args["num_query_groups"], args["tensor_model_parallel_size"]) == (2, 2)
    local = rank["model"]
    assert local["output_layer.weight"].shape == (128, 64)  # half of the padded vocabulary
    assert "decoder.layers.1.self_attention.linear_qkv.weight" in local  # layers 2, 3 as 0, 1
    assert "decoder.layers.2.self_attention.linear_qkv.weight" not in local
    # one query group per rank: 2 q heads, k, v of 16 rows each
    assert local["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (64, 64)


def test_legacy_names_tp2_pp2_round_trip_and_lay_out_as_megatron_lm_saves_them(
        hf_folder, model, tmp_path):
    """The legacy GPT model's nested state dict, each TP rank's QKV holding its query group
    [q heads; k; v] and its dense_h_to_4h [gate_r; up_r], checked against the source's own
    tensors (not through our converter's layout code)."""
    manifest = _round_trips(hf_folder, tmp_path, tensor_parallel=2, pipeline_parallel=2,
                            megatron_names="legacy")
    assert manifest.summary["megatron"]["names"] == "legacy"
    release = tmp_path / "mg" / "release"
    first = load_pickled(release / "mp_rank_00_000" / "model_optim_rng.pt")["model"]
    assert sorted(first) == ["language_model"]
    assert sorted(first["language_model"]) == ["embedding", "encoder"]
    assert first["language_model"]["embedding"]["word_embeddings"]["weight"].shape == (128, 64)
    rank = load_pickled(release / "mp_rank_01_001" / "model_optim_rng.pt")
    args = vars(rank["args"])
    assert (args["use_legacy_models"], args["transformer_impl"], args["normalization"],
            args["swiglu"], args["position_embedding_type"],
            args["untie_embeddings_and_output_weights"], args["group_query_attention"],
            args["num_query_groups"]) == (True, "local", "RMSNorm", True, "rope", True, True, 2)
    language_model = rank["model"]["language_model"]
    assert sorted(language_model) == ["encoder", "output_layer"]
    assert language_model["output_layer"]["weight"].shape == (128, 64)
    encoder = language_model["encoder"]
    assert sorted(encoder) == sorted(
        [f"layers.{i}.{name}" for i in (0, 1) for name in (
            "input_norm.weight", "self_attention.query_key_value.weight",
            "self_attention.dense.weight", "post_attention_norm.weight",
            "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight")] + ["final_norm.weight"])
    block = model.layers["2"]  # pipeline rank 1's layer 0; TP rank 1: query group 1
    q, k, v = (getattr(block.attn, w).weight for w in ("wq", "wk", "wv"))
    assert torch.equal(encoder["layers.0.self_attention.query_key_value.weight"],
                       torch.cat([q[32:], k[16:], v[16:]]))
    assert torch.equal(encoder["layers.0.mlp.dense_h_to_4h.weight"],
                       torch.cat([block.mlp.w_gate.weight[48:], block.mlp.w_up.weight[48:]]))
    assert torch.equal(encoder["layers.0.self_attention.dense.weight"], block.attn.wo.weight[:, 32:])


def test_virtual_pipeline_chunks_sit_where_megatron_lm_puts_them_and_round_trip(model, tmp_path):
    """PP 2 x VP 2 over 4 layers: pipeline rank s holds model0 = layer s and model1 = layer
    2 + s, each numbered 0 within its chunk (Megatron-LM's interleaved assignment)."""
    convert_native(model, tmp_path / "native")
    convert(tmp_path / "native", tmp_path / "mg", "native", "megatron", pipeline_parallel=2,
            virtual_pipeline_parallel=2)
    release = tmp_path / "mg" / "release"
    ranks = [load_pickled(release / f"mp_rank_00_{s:03d}" / "model_optim_rng.pt")
             for s in range(2)]
    assert (vars(ranks[0]["args"])["virtual_pipeline_model_parallel_size"],
            vars(ranks[0]["args"])["num_layers_per_virtual_pipeline_stage"]) == (2, 1)
    proj = "decoder.layers.0.self_attention.linear_proj.weight"
    for s, rank in enumerate(ranks):
        assert "model" not in rank
        for c in range(2):
            chunk = rank[f"model{c}"]
            assert torch.equal(chunk[proj], model.layers[str(2 * c + s)].attn.wo.weight)
            assert "decoder.layers.1.self_attention.linear_proj.weight" not in chunk
            assert ("embedding.word_embeddings.weight" in chunk) == ((s, c) == (0, 0))
            assert ("output_layer.weight" in chunk) == ((s, c) == (1, 1))
            assert ("decoder.final_layernorm.weight" in chunk) == ((s, c) == (1, 1))

    convert(tmp_path / "mg", tmp_path / "back", "megatron", "native")
    result = load_native(tmp_path / "back")[1]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, result.state_dict()[name]), name
    assert torch.equal(our_logits(result), our_logits(model))

    file = release / "mp_rank_00_001" / "model_optim_rng.pt"
    data = torch.load(file, weights_only=False)
    del data["model1"]
    torch.save(data, file)
    with pytest.raises(InputError, match=r"mp_rank_00_001/model_optim_rng\.pt: 1 model chunks, "
                                         r".*mp_rank_00_000/model_optim_rng\.pt has 2"):
        convert(tmp_path / "mg", tmp_path / "out", "megatron", "native")


def _legacy_rank_files(model: LlamaModel, root: Path, epfl: bool, tp: int = 2) -> None:
    """A legacy-GPT (Megatron Cookbook) or EPFL Megatron-LLM checkpoint, nested dicts as they
    save them: TP 2, the vocabulary padded to 256."""
    cfg = model.cfg
    padded = padded_vocab(cfg.vocab_size, 128, tp)
    parts = to_parts(model.state_dict(), cfg, padded, epfl=epfl)
    attention = "attention" if epfl else "self_attention"
    layer_names = {"attn_norm": "input_layernorm.weight",
                   "qkv": f"{attention}.query_key_value.weight",
                   "proj": f"{attention}.dense.weight",
                   "mlp_norm": "post_attention_layernorm.weight",
                   "fc1": "mlp.dense_h_to_4h.weight", "fc2": "mlp.dense_4h_to_h.weight"}
    if epfl:
        args = dict(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                    num_attention_heads_kv=2, max_position_embeddings=64, use_rms_norm=True,
                    glu_activation="swiglu", tie_embed_logits=False, layernorm_epsilon=1e-5,
                    rope_theta=10000.0, tensor_model_parallel_size=tp, padded_vocab_size=padded)
    else:
        args = dict(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                    group_query_attention=True, num_query_groups=2, max_position_embeddings=64,
                    normalization="RMSNorm", swiglu=True, untie_embeddings_and_output_weights=True,
                    norm_epsilon=1e-5, tensor_model_parallel_size=tp, padded_vocab_size=padded,
                    rotary_base=500000)  # in the args, but the legacy model uses 10000
    for t in range(tp):
        def shard(layer, part):
            return split(parts[layer, part], part, tp)[t]
        encoder = {f"layers.{i}.{name}": shard(i, part)
                   for i in range(cfg.num_layers) for part, name in layer_names.items()}
        encoder["final_layernorm.weight"] = shard(None, "final_norm")
        language_model = {"embedding": {"word_embeddings": {"weight": shard(None, "embed")}},
                          "transformer" if epfl else "encoder": encoder}
        if epfl:
            language_model["lm_head"] = shard(None, "output")
        else:
            language_model["output_layer"] = {"weight": shard(None, "output")}
        file = root / "iter_0000010" / f"mp_rank_{t:02d}" / "model_optim_rng.pt"
        file.parent.mkdir(parents=True)
        torch.save({"model": {"language_model": language_model},
                    "args": argparse.Namespace(**args),
                    "checkpoint_version": 3.0, "iteration": 10}, file)
    (root / "latest_checkpointed_iteration.txt").write_text("10")


@pytest.mark.parametrize("layout", ["legacy-gpt", "epfl", "te-names"])
def test_every_megatron_naming_imports_to_the_same_logits(model, tmp_path, layout):
    src = tmp_path / "src"
    if layout == "te-names":
        ours = tmp_path / "native"
        convert_native(model, ours)
        convert(ours, src, "native", "megatron", megatron_norm_names="te", tensor_parallel=2)
        assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in load_pickled(
            src / "release" / "mp_rank_00" / "model_optim_rng.pt")["model"]
    else:
        _legacy_rank_files(model, src, epfl=layout == "epfl")
    fmt = "megatron-epfl" if layout == "epfl" else "megatron"
    fields = {} if layout == "te-names" else {"vocab_size": 200}
    convert(src, tmp_path / "out", fmt, "native", **fields)
    result = load_native(tmp_path / "out")[1]
    assert result.cfg.vocab_size == 200
    assert torch.allclose(our_logits(result), our_logits(model), atol=1e-6, rtol=0)


def test_epfl_files_given_as_megatron_are_refused_with_a_hint(model, tmp_path):
    """EPFL files given as plain Megatron are refused by their args, not read with the wrong
    fc1 and RoPE layouts."""
    _legacy_rank_files(model, tmp_path / "src", epfl=True)
    with pytest.raises(InputError, match=r"normalization=None, swiglu=None .*use "
                                         r"--source-format megatron-epfl"):
        convert(tmp_path / "src", tmp_path / "out", "megatron", "native", vocab_size=200)


def convert_native(model: LlamaModel, folder: Path) -> None:
    from engine.checkpoint.store import save_checkpoint
    save_checkpoint(folder, 0, model, None, {}, model.cfg.model_dump(mode="json"))


@pytest.fixture(scope="module")
def megatron_core_run(model, tmp_path_factory) -> Path:
    """megatron-core 0.16.1 in a process of its own, on our TP 1 exports (both formats)."""
    pytest.importorskip("megatron.core")
    work = tmp_path_factory.mktemp("mcore")
    convert_native(model, work / "native")
    convert(work / "native", work / "legacy", "native", "megatron")
    convert(work / "native", work / "dist", "native", "mcore-dist")
    (work / "model_config.json").write_text(CFG.model_dump_json())
    (work / "padded_vocab.txt").write_text("256")
    torch.save(IDS, work / "ids.pt")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    done = subprocess.run([sys.executable, "-W", "ignore", str(REPO / "tests" /
                                                                "megatron_reference.py"),
                           str(work)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return work


def test_megatron_core_runs_our_per_rank_export(model, megatron_core_run):
    theirs = torch.load(megatron_core_run / "legacy_logits.pt")
    assert theirs.shape == (2, 24, 256)
    assert torch.allclose(theirs[..., :200], our_logits(model), atol=1e-4, rtol=0)


def test_megatron_core_loads_our_torch_dist_export(model, megatron_core_run):
    theirs = torch.load(megatron_core_run / "dist_logits.pt")
    assert torch.allclose(theirs[..., :200], our_logits(model), atol=1e-4, rtol=0)


def test_torch_dist_saved_by_megatron_core_imports(megatron_core_run, tmp_path):
    manifest = convert(megatron_core_run / "mcore", tmp_path / "out", "mcore-dist", "native")
    result = load_native(tmp_path / "out")[1]
    theirs = torch.load(megatron_core_run / "mcore_logits.pt")
    assert torch.allclose(theirs[..., :200], our_logits(result), atol=1e-4, rtol=0)
    assert manifest.summary["verification"]["max_abs_diff"] == 0.0


def test_a_layout_that_does_not_divide_the_model_is_refused_before_queueing(hf_folder, tmp_path):
    with pytest.raises(ValidationError, match="tensor_parallel 4 does not divide num_kv_heads "
                                              r"\(query groups.*\) 2"):
        Spec(load_dir=str(hf_folder), save_dir="out", source_format="hf",
             target_format="megatron", tensor_parallel=4)
    with pytest.raises(ValidationError, match="pipeline_parallel 3 does not divide num_layers"):
        Spec(load_dir=str(hf_folder), save_dir="out", source_format="hf",
             target_format="mcore-dist", pipeline_parallel=3)
    with pytest.raises(ValidationError, match="apply to Megatron output"):
        Spec(load_dir=str(hf_folder), save_dir="out", source_format="hf", target_format="hf",
             tensor_parallel=2)
    with pytest.raises(ValidationError, match="source format only"):
        Spec(load_dir=str(hf_folder), save_dir="out", source_format="hf",
             target_format="megatron-epfl")
    with pytest.raises(ValidationError, match=r"pipeline_parallel 2 x virtual_pipeline_parallel "
                                              r"3 \(6 model chunks\) does not divide num_layers 4"):
        Spec(load_dir=str(hf_folder), save_dir="out", source_format="hf",
             target_format="megatron", pipeline_parallel=2, virtual_pipeline_parallel=3)
    with pytest.raises(ValidationError, match="virtual_pipeline_parallel 2 needs pipeline_parallel"):
        Spec(load_dir=str(hf_folder), save_dir="out", source_format="hf",
             target_format="megatron", virtual_pipeline_parallel=2)
    with pytest.raises(ValidationError, match="megatron_names apply to target_format megatron"):
        Spec(load_dir=str(hf_folder), save_dir="out", source_format="hf",
             target_format="mcore-dist", megatron_names="legacy")
    with pytest.raises(ValidationError, match="te is for megatron-core names"):
        Spec(load_dir=str(hf_folder), save_dir="out", source_format="hf",
             target_format="megatron", megatron_names="legacy", megatron_norm_names="te")
    llama3 = tmp_path / "llama3"
    llama3.mkdir()
    (llama3 / "config.json").write_text(json.dumps(
        CFG.model_copy(update={"rope_theta": 500000.0}).to_hf()))
    with pytest.raises(ValidationError, match="rope_theta 500000: Megatron-LM's legacy model "
                                              "always uses RoPE base 10000"):
        Spec(load_dir=str(llama3), save_dir="out", source_format="hf",
             target_format="megatron", megatron_names="legacy")


def test_missing_rank_file_unknown_key_and_foreign_class(model, tmp_path):
    convert_native(model, tmp_path / "native")
    convert(tmp_path / "native", tmp_path / "mg", "native", "megatron", tensor_parallel=2,
            pipeline_parallel=2)
    file = tmp_path / "mg" / "release" / "mp_rank_01_001" / "model_optim_rng.pt"
    data = torch.load(file, weights_only=False)
    file.unlink()
    with pytest.raises(InputError, match=r"mp_rank_01_001/model_optim_rng\.pt: missing; the "
                                         r"checkpoint's args say TP 2 x PP 2"):
        convert(tmp_path / "mg", tmp_path / "out", "megatron", "native")
    data["model"]["decoder.layers.0.mystery.weight"] = torch.zeros(2)
    torch.save(data, file)
    with pytest.raises(InputError, match=r"tensors of no known Megatron name: "
                                         r"decoder\.layers\.0\.mystery\.weight"):
        convert(tmp_path / "mg", tmp_path / "out", "megatron", "native")
    data["model"].pop("decoder.layers.0.mystery.weight")
    data["payload"] = subprocess.Popen  # a class whose unpickling could run code
    torch.save(data, file)
    with pytest.raises(InputError, match=r"refuses to unpickle .*Popen: not a class Megatron"):
        convert(tmp_path / "mg", tmp_path / "out", "megatron", "native")
    assert not (tmp_path / "out").exists()
