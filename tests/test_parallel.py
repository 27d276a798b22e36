"""Model parallelism on CPU (gloo): every layout trains like one process — the same losses,
validation losses and weights after 6 steps with gradient clipping, fp32 — no rank holds the
whole model, a run resumes in another layout, and layouts that do not fit are refused before
anything runs, naming the numbers."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_MODEL, engine_ranks, logged_losses
from engine.checkpoint import store as ckpt
from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel
from engine.train.spec import PretrainSpec


MODEL = {**TINY_MODEL, "num_layers": 4}  # 4 pipeline stages at PP 2 × 2 virtual


def _spec(dataset: str, save: Path, **over) -> dict:
    return {"model": MODEL, "data": {"blend": [dataset], "split": "95,5,0", "seq_length": 32},
            "checkpoint": {"save": str(save)}, "iters": 6, "micro_batch_size": 2,
            "global_batch_size": 8, "precision": "fp32", "log_interval": 1, "device": "cpu",
            # Adam's eps well above the rounding of a near-zero gradient: with 1e-8, an
            # element whose gradient is ~1e-8 moves by a lr-sized step whose sign its
            # summation order decides (isolated 1.7e-5 weight differences at TP 2, 4 layers)
            "optim": {"lr": 3e-3, "warmup_iters": 2, "clip_grad": 0.5, "eps": 1e-6},
            "eval": {"interval": 3, "iters": 1}, **over}


def train_ranks(spec: dict, ranks: int, tmp: Path) -> list[str]:
    """`python -m engine pretrain` as `ranks` processes of one job; their logs."""
    cfg = tmp / f"spec-{time.monotonic_ns()}.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    return engine_ranks(["pretrain", "--config", str(cfg)], ranks=ranks)


def parameter_shares(logs: list[str]) -> list[float]:
    """Each rank's allocated parameter bytes as a share of the whole model's (build's log)."""
    found = [re.search(r"holds (\d+) parameter bytes of the model's (\d+)", log) for log in logs]
    return [int(m.group(1)) / int(m.group(2)) for m in found]


def valid_losses(save: Path) -> dict[int, float]:
    records = (json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["data"]["valid_loss"] for r in records
            if r["kind"] == "metrics" and "valid_loss" in r["data"]}


def assert_like_one_process(reference: Path, save: Path) -> None:
    one, many = logged_losses(reference), logged_losses(save)
    assert sorted(many) == list(range(1, 7))
    assert max(abs(one[i] - many[i]) for i in one) < 1e-5, (one, many)
    v1, vn = valid_losses(reference), valid_losses(save)
    assert sorted(vn) == [3, 6] and max(abs(v1[i] - vn[i]) for i in v1) < 1e-5, (v1, vn)
    a, b = weights(reference), weights(save)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def weights(save: Path) -> dict[str, torch.Tensor]:
    path = ckpt.checkpoint_path(save)
    with torch.device("meta"):
        model = LlamaModel(ModelConfig.model_validate(ckpt.read_model_config(path)))
    model.to_empty(device="cpu")
    ckpt.load_checkpoint(path, model)
    return model.state_dict()


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("one-process") / "run"
    logs = train_ranks(_spec(tiny_dataset, save), 1, save.parent)
    assert parameter_shares(logs) == [1.0]  # the measure below counts a whole model as whole
    return save


PP = {"pipeline_parallel": 2}
LAYOUTS = {  # name: (ranks, spec fields, the most of the model's parameters one rank may hold)
    "tp2-no-sp-full": (2, {"tensor_parallel": 2, "sequence_parallel": False, "recompute": "full"},
                       0.51),
    "fsdp2-cpu-offload": (2, {"data_parallel": "fsdp", "cpu_offload": True}, 0.51),
    "one-process-cpu-offload": (1, {"data_parallel": "fsdp", "cpu_offload": True}, 1.01),
    "hsdp2x2": (4, {"data_parallel": "fsdp", "data_parallel_replicate": 2}, 0.51),
    "tp2-fsdp2": (4, {"tensor_parallel": 2, "data_parallel": "fsdp"}, 0.26),
    "dp2-cp2": (4, {"context_parallel": 2}, 1.01),  # DDP: a whole model per rank
    "ddp2-no-overlap": (2, {"overlap_grad_reduce": False}, 1.01),
    "cp4-fsdp": (4, {"context_parallel": 4, "data_parallel": "fsdp"}, 0.26),
    "cp2-tp2-fsdp-selective": (4, {"context_parallel": 2, "tensor_parallel": 2,
                                   "data_parallel": "fsdp", "recompute": "selective"}, 0.26),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_trains_like_one_process(name, tiny_dataset, reference, tmp_path):
    ranks, fields, most = LAYOUTS[name]
    save = tmp_path / name
    shares = parameter_shares(train_ranks(_spec(tiny_dataset, save, **fields), ranks, tmp_path))
    assert max(shares) < most and sum(shares) >= 1.0, shares
    assert_like_one_process(reference, save)


@pytest.mark.slow
def test_pipelines_train_like_one_process_and_resume_in_another_layout(tiny_dataset, reference,
                                                                       tmp_path):
    """TP 2 × PP 2 (1f1b over stages of 3 and 1 layers, sequence parallel, selective recompute)
    for 6 steps, saving at step 3; then steps 4-6 again from that checkpoint at PP 2 × 2 virtual
    stages (interleaved-1f1b, full recompute) × FSDP 2. Both runs are one process's."""
    save = tmp_path / "run"
    tp_pp = {**PP, "tensor_parallel": 2, "pipeline_layers": [3, 1], "recompute": "selective"}
    logs = train_ranks(_spec(tiny_dataset, save, checkpoint={"save": str(save), "interval": 3},
                             **tp_pp), 4, tmp_path)
    # the first stage holds the embedding and 3 of the 4 blocks, halved by TP
    assert max(parameter_shares(logs)) < 0.34 and sum(parameter_shares(logs)) >= 1.0
    assert_like_one_process(reference, save)
    shutil.rmtree(ckpt.iter_dir(save, 6))  # as if stopped after the checkpoint of iteration 3
    (save / "manifest.json").unlink()
    (save / "latest_checkpointed_iteration.txt").write_text("3\n")
    pp_fsdp = {**PP, "pipeline_schedule": "interleaved-1f1b", "virtual_stages": 2,
               "recompute": "full", "data_parallel": "fsdp", "precision": "fp32"}
    logs = train_ranks(_spec(tiny_dataset, save, **pp_fsdp), 4, tmp_path)
    assert f"resumed from {ckpt.iter_dir(save, 3)}" in logs[0]
    assert max(parameter_shares(logs)) < 0.26 and sum(parameter_shares(logs)) >= 1.0
    assert_like_one_process(reference, save)


def test_layouts_that_do_not_divide_are_refused(tiny_dataset, tmp_path):
    def spec(**fields) -> PretrainSpec:
        return PretrainSpec.model_validate(_spec(tiny_dataset, tmp_path / "x", **fields))

    with pytest.raises(ValueError, match="num_kv_heads 2 is not divisible by tensor_parallel 4"):
        spec(tensor_parallel=4)
    with pytest.raises(ValueError, match="world size 6 is not a multiple of tensor_parallel 4"):
        spec(tensor_parallel=4, model={**TINY_MODEL, "num_heads": 8, "num_kv_heads": 4}
             ).check_world(6)
    with pytest.raises(ValueError, match="4 data-parallel ranks .* not a multiple of "
                                         "data_parallel_replicate 3"):
        spec(data_parallel="fsdp", data_parallel_replicate=3).check_world(4)
    with pytest.raises(ValueError, match="global_batch_size 8 is not a multiple of "
                                         "micro_batch_size 2 × 8 data-parallel ranks"):
        spec().check_world(8)
    with pytest.raises(ValueError, match="bf16-master is for a whole model per rank"):
        spec(tensor_parallel=2, precision="bf16-master")
    with pytest.raises(ValueError, match="cpu_offload needs data_parallel fsdp"):
        spec(cpu_offload=True)
    with pytest.raises(ValueError, match="cpu_offload is not supported with tensor_parallel"):
        spec(cpu_offload=True, data_parallel="fsdp", tensor_parallel=2)
    for layout in ({"data_parallel": "fsdp"}, {"tensor_parallel": 2}):
        with pytest.raises(ValueError, match="overlap_grad_reduce false is for DDP alone"):
            spec(overlap_grad_reduce=False, **layout)
    unnamed = {k: v for k, v in _spec(tiny_dataset, tmp_path / "x").items() if k != "precision"}
    assert [PretrainSpec.model_validate({**unnamed, **layout}).precision for layout in
            ({}, {"tensor_parallel": "2"}, {"pipeline_parallel": 2}, {"data_parallel": "fsdp"})
            ] == ["bf16-master", "bf16", "bf16", "bf16"]  # a split model keeps fp32 weights


def test_context_parallel_layouts_that_do_not_fit_are_refused(tiny_dataset, tmp_path):
    def spec(**fields) -> PretrainSpec:
        return PretrainSpec.model_validate(_spec(tiny_dataset, tmp_path / "x", **fields))

    with pytest.raises(ValueError, match="data.seq_length 32 is not a multiple of 2 × "
                                         "context_parallel = 6"):
        spec(context_parallel=3)
    with pytest.raises(ValueError, match="data.seq_length / context_parallel = 10 is not a "
                                         "multiple of tensor_parallel 4"):
        spec(context_parallel=2, tensor_parallel=4, model={**MODEL, "num_kv_heads": 4},
             data={"blend": [tiny_dataset], "seq_length": 20})
    with pytest.raises(ValueError, match="context_parallel is not supported with "
                                         "pipeline_parallel"):
        spec(context_parallel=2, **PP)
    with pytest.raises(ValueError, match="rope_scaling dynamic cannot be trained with "
                                         "context_parallel"):
        spec(context_parallel=2, model={**MODEL, "rope_scaling": {"type": "dynamic",
                                                                  "factor": 2.0}})
    with pytest.raises(ValueError, match="world size 6 is not a multiple of tensor_parallel 2 "
                                         "× pipeline_parallel 1 × context_parallel 2 = 4"):
        spec(context_parallel=2, tensor_parallel=2).check_world(6)
    # 8 ranks: 2 context-parallel, 4 data-parallel ranks, each a micro-batch of 2 samples
    assert spec(context_parallel=2).layout(8).describe() == (
        "pp 1 × dp_replicate 4 × dp_shard 1 × cp 2 × tp 1")
    with pytest.raises(ValueError, match="micro_batch_size 2 × 8 data-parallel ranks"):
        spec(context_parallel=2).check_world(16)


def test_pipelines_that_do_not_fit_are_refused(tiny_dataset, tmp_path):
    def spec(**fields) -> PretrainSpec:
        return PretrainSpec.model_validate(_spec(tiny_dataset, tmp_path / "x", **PP, **fields))

    with pytest.raises(ValueError, match=r"'interleaved-1f1b' needs virtual ≥ 2 stages per rank"):
        spec(pipeline_schedule="interleaved-1f1b")
    with pytest.raises(ValueError, match="num_layers 4 is fewer than the 6 pipeline stages"):
        spec(pipeline_schedule="interleaved-1f1b", virtual_stages=3)
    with pytest.raises(ValueError, match=r"layers_per_stage \[2, 1\] .* sum to the model's 4"):
        spec(pipeline_layers=[2, 1])
    with pytest.raises(ValueError, match="tie_word_embeddings is not supported with 2 pipeline"):
        spec(model={**MODEL, "tie_word_embeddings": True})
    with pytest.raises(ValueError, match="virtual_stages and pipeline_layers need "
                                         "pipeline_parallel > 1"):
        PretrainSpec.model_validate(_spec(tiny_dataset, tmp_path / "x", virtual_stages=2))
    # 8 ranks: 4 data-parallel, so each runs 8 / (2 × 4) = 1 micro-batch through 2 stages
    with pytest.raises(ValueError, match=r"1 micro-batches for 2 stages \(global_batch_size 8 / "
                                         r"\(micro_batch_size 2 × 4 data-parallel ranks\)\)"):
        spec().check_world(8)
    with pytest.raises(ValueError, match="validation under pipeline_schedule zbv is not supported"):
        spec(pipeline_schedule="zbv", virtual_stages=2)  # torch's V schedules: no forward only
    spec(pipeline_schedule="zbv", virtual_stages=2, eval={"interval": None}).check_world(2)
    spec(pipeline_layers=[3, 1]).check_world(4)
