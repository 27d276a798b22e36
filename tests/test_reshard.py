"""The reshard stage on CPU: a checkpoint trained with FSDP on 2 gloo ranks, rewritten for TP 2 on
those ranks and then for 1 rank, holds the same weights and optimizer state bit for bit; training
resumed from the 1-rank copy continues the 2-rank run's loss sequence; weights-only and
consolidated outputs; layouts that do not fit; and a checkpoint of MasterAdamW (DDP's
bf16-master) loaded by torch's AdamW in another layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from conftest import engine_ranks, logged_losses
from engine.checkpoint import store as ckpt
from engine.checkpoint.safe_load import SafeReader
from engine.errors import InputError, SpecError
from engine.model.config import ModelConfig
from engine.parallel.layout import Layout
from engine.parallel.mesh import build_mesh
from engine.reshard import stage as reshard
from engine.reshard.consolidated import read_consolidated
from engine.reshard.spec import Spec
from engine.spec import load_spec
from engine.train.build import build
from engine.train.loop import train
from engine.train.spec import PretrainSpec
from test_parallel import _spec


def _train_spec(dataset: str, save: Path, **over) -> dict:
    return _spec(dataset, save, **{"iters": 4, "checkpoint": {"save": str(save), "interval": 2},
                                   **over})


@pytest.fixture(scope="module")
def job(tiny_dataset, tmp_path_factory) -> tuple[Path, Path]:
    """One job of 2 ranks: 4 steps with FSDP (checkpoints at 2 and 4), then iteration 2
    resharded for TP 2 on the same ranks. (The training folder, the TP 2 copy.)"""
    root = tmp_path_factory.mktemp("fsdp2")
    save, tp2 = root / "run", root / "tp2"
    config = root / "pretrain.yaml"
    config.write_text(yaml.safe_dump(_train_spec(tiny_dataset, save, data_parallel="fsdp")))
    engine_ranks(["pretrain", "--config", str(config)],
                 ["reshard", "--input", str(ckpt.iter_dir(save, 2)), "--output", str(tp2),
                  "--tensor-parallel", "2", "--device", "cpu"], ranks=2)
    return save, tp2


def everything(path: Path, dataset: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, loaded into one process: weights, and the optimizer's
    state when it holds one."""
    meta = ckpt.check_complete(ckpt.checkpoint_path(path))
    spec = PretrainSpec.model_validate(_spec(dataset, path / "unused"))
    cpu = torch.device("cpu")
    cfg = ModelConfig.model_validate(ckpt.read_model_config(ckpt.checkpoint_path(path)))
    built = build(cfg, spec, build_mesh(Layout(), cpu), cpu)
    optimizer = built.optimizer if meta["has_optimizer"] else None
    ckpt.load_checkpoint(ckpt.checkpoint_path(path), built.model, optimizer)
    out = {f"model.{k}": v for k, v in built.model.state_dict().items()}
    if optimizer is not None:
        for name, state in get_optimizer_state_dict(built.model, optimizer)["state"].items():
            out |= {f"optim.{name}.{key}": value for key, value in state.items()}
    return out


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_fsdp2_to_tp2_to_one_rank_keeps_every_bit_and_the_losses(job, tiny_dataset, tmp_path):
    save, tp2 = job
    expected = everything(ckpt.iter_dir(save, 2), tiny_dataset)
    assert any(k.endswith("exp_avg_sq") for k in expected)
    meta = ckpt.read_meta(ckpt.iter_dir(tp2, 2))
    assert (meta["world_size"], meta["layout"]["tp"], meta["spec"]["tensor_parallel"]) == (2, 2, 2)
    assert meta["resharded_from"]["layout"] == {"pp": 1, "dp_replicate": 1, "dp_shard": 2, "cp": 1,
                                                "tp": 1}
    assert_equal(everything(tp2, tiny_dataset), expected)

    one = tmp_path / "one-rank"
    manifest = reshard.run(Spec(input=str(tp2), output=str(one), device="cpu"))
    assert manifest.summary["world_size"] == 1 and manifest.summary["tensors_verified"] > 0
    meta = ckpt.read_meta(ckpt.iter_dir(one, 2))
    assert (meta["world_size"], meta["spec"]["tensor_parallel"], meta["consumed_samples"]) == \
        (1, 1, 16)
    assert_equal(everything(one, tiny_dataset), expected)
    assert reshard.run(Spec(input=str(tp2), output=str(one), device="cpu")) == manifest  # kept

    resumed = tmp_path / "resumed"
    train(PretrainSpec.model_validate(_train_spec(tiny_dataset, resumed, load=str(one))),
          "pretrain")
    two, after = logged_losses(save), logged_losses(resumed)
    assert sorted(after) == [3, 4]
    assert max(abs(two[i] - after[i]) for i in after) < 1e-5, (two, after)


def test_weights_only_and_consolidated(job, tiny_dataset, tmp_path):
    source = ckpt.iter_dir(job[0], 4)
    expected = everything(source, tiny_dataset)
    light = tmp_path / "weights"
    manifest = reshard.run(Spec(input=str(source), output=str(light), optimizer=False,
                                data_parallel="fsdp", device="cpu"))
    path = ckpt.iter_dir(light, 4)
    assert not ckpt.read_meta(path)["has_optimizer"]
    assert not any(k.startswith("optim") for k in SafeReader(str(path)).read_metadata()
                   .state_dict_metadata)
    assert manifest.summary["bytes"] < manifest.summary["source"]["bytes"] / 2
    assert_equal(everything(light, tiny_dataset),
                 {k: v for k, v in expected.items() if k.startswith("model.")})
    with pytest.raises(ValueError, match="holds no optimizer state .* pass --no-optimizer"):
        Spec(input=str(light), output=str(tmp_path / "again"))  # checked before any job
    with pytest.raises(InputError, match="holds no optimizer state .* finetune starts from the "
                                         "weights"):
        train(PretrainSpec.model_validate(_train_spec(tiny_dataset, tmp_path / "resume",
                                                      load=str(light), iters=6)), "pretrain")

    single = tmp_path / "consolidated"
    reshard.run(Spec(input=str(source), output=str(single), consolidate=True, device="cpu"))
    assert sorted(p.name for p in single.iterdir()) == ["manifest.json", "model.safetensors",
                                                        "model_config.json"]
    weights, optim, metadata = read_consolidated(single / "model.safetensors")
    found = {f"model.{k}": v for k, v in weights.items()}
    found |= {f"optim.{name}.{key}": value for name, state in optim["state"].items()
              for key, value in state.items()}
    assert_equal(found, expected)
    assert json.loads(metadata["meta"])["iteration"] == 4
    assert optim["param_groups"][0]["betas"] == [0.9, 0.95]


def test_layouts_that_do_not_fit_are_refused(job, tmp_path):
    """(A tensor_parallel the model does not divide, a missing shard: tests/bad_inputs_*.)"""
    source, out = ckpt.iter_dir(job[0], 2), tmp_path / "out"
    with pytest.raises(SpecError, match="num_layers 4 is fewer than the 8 pipeline stages"):
        load_spec(Spec, overrides={"input": str(source), "output": str(out),
                                   "pipeline_parallel": 8})
    with pytest.raises(ValueError, match="world size 3 is not a multiple of tensor_parallel 2"):
        Spec(input=str(source), output=str(out), tensor_parallel=2).check_world(3)


def test_master_weights_checkpoint_reshards_for_fsdp(tiny_dataset, tmp_path):
    """DDP's default, bf16-master, keeps MasterAdamW's state; FSDP and TP train with torch's
    AdamW, whose param groups hold more flags: the checkpoint still loads there."""
    save = tmp_path / "master"
    train(PretrainSpec.model_validate(_spec(tiny_dataset, save, iters=2, precision="bf16-master")),
          "pretrain")
    out = tmp_path / "fsdp"
    reshard.run(Spec(input=str(save), output=str(out), data_parallel="fsdp", device="cpu"))
    assert ckpt.read_meta(ckpt.iter_dir(out, 2))["spec"]["precision"] == "bf16"
    assert_equal(everything(out, tiny_dataset), everything(save, tiny_dataset))
