"""Model parallelism on CPU (gloo): every layout trains like one process — the same losses and
weights after 6 steps with gradient clipping, fp32 — and layouts that do not fit are refused
before anything runs, naming the numbers."""

from __future__ import annotations

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


def _spec(dataset: str, save: Path, **over) -> dict:
    return {"model": TINY_MODEL, "data": {"blend": [dataset], "split": "95,5,0", "seq_length": 32},
            "checkpoint": {"save": str(save)}, "iters": 6, "micro_batch_size": 2,
            "global_batch_size": 8, "precision": "fp32", "log_interval": 1, "device": "cpu",
            "optim": {"lr": 3e-3, "warmup_iters": 2, "clip_grad": 0.5}, **over}


def train_ranks(spec: dict, ranks: int, tmp: Path) -> None:
    """`python -m engine pretrain` as `ranks` processes of one job."""
    cfg = tmp / f"spec-{time.monotonic_ns()}.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    engine_ranks(["pretrain", "--config", str(cfg)], ranks=ranks)


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
    train_ranks(_spec(tiny_dataset, save), 1, save.parent)
    return save


LAYOUTS = {  # name: (ranks, spec fields)
    "tp2-selective": (2, {"tensor_parallel": 2, "recompute": "selective"}),
    "tp2-no-sp-full": (2, {"tensor_parallel": 2, "sequence_parallel": False, "recompute": "full"}),
    "hsdp2x2": (4, {"data_parallel": "fsdp", "data_parallel_replicate": 2}),
    "tp2-fsdp2": (4, {"tensor_parallel": 2, "data_parallel": "fsdp"}),
    "tp2-ddp2": (4, {"tensor_parallel": 2}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_trains_like_one_process(name, tiny_dataset, reference, tmp_path):
    ranks, fields = LAYOUTS[name]
    save = tmp_path / name
    train_ranks(_spec(tiny_dataset, save, **fields), ranks, tmp_path)
    one, many = logged_losses(reference), logged_losses(save)
    assert sorted(many) == list(range(1, 7))
    assert max(abs(one[i] - many[i]) for i in one) < 1e-5, (one, many)
    a, b = weights(reference), weights(save)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


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
