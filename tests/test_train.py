"""Training: exact resume after kill -9, data parallelism equal to one rank, signals, non-finite
losses, finetune, schedules, and clear errors for bad specs and checkpoints."""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_MODEL, forked_engine, logged_losses
from engine.errors import InputError, SpecError
from engine.manifest import sha256_file
from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel
from engine.spec import load_spec
from engine.checkpoint import store as ckpt
from engine.train.schedule import LRSchedule
from engine.train.spec import PretrainSpec

MODEL = TINY_MODEL


@pytest.fixture(scope="module")
def dataset(tiny_dataset) -> str:
    return tiny_dataset


def _spec(dataset: str, save: Path, **over) -> dict:
    spec = {"model": MODEL, "data": {"blend": [dataset], "split": "95,5,0", "seq_length": 32},
            "checkpoint": {"save": str(save), "interval": 10, "keep_last": 3},
            "iters": 20, "micro_batch_size": 2, "global_batch_size": 8, "precision": "fp32",
            "optim": {"lr": 3e-3, "warmup_iters": 3, "min_lr": 3e-4}, "log_interval": 1,
            "device": "cpu"}
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


def _engine(stage: str, spec: dict, tmp: Path, env: dict | None = None, wait: bool = True):
    """`python -m engine STAGE --config ...` as a process of its own (forked_engine): (exit
    status, stdout, stderr), or the process with `wait` False."""
    cfg = tmp / f"{stage}-{time.monotonic_ns()}.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    proc = forked_engine([stage, "--config", str(cfg)], env=env)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def _weights(save: Path, iteration: int) -> dict[str, torch.Tensor]:
    path = ckpt.iter_dir(save, iteration)
    with torch.device("meta"):
        model = LlamaModel(ModelConfig.model_validate(ckpt.read_model_config(path)))
    model.to_empty(device="cpu")
    ckpt.load_checkpoint(path, model)
    return model.state_dict()


def test_resume_after_kill_9_is_bitwise_exact(dataset, tmp_path):
    straight = tmp_path / "straight"
    code, _, err = _engine("pretrain", _spec(dataset, straight, iters=40), tmp_path)
    assert code == 0, err

    killed = tmp_path / "killed"
    proc = _engine("pretrain", _spec(dataset, killed, iters=40), tmp_path, wait=False)
    deadline = time.time() + 120
    while ckpt.latest_iteration(killed) is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    first = ckpt.latest_iteration(killed)
    assert first is not None and first < 40, "the kill must land mid-training"
    code, _, err = _engine("pretrain", _spec(dataset, killed, iters=40), tmp_path)
    assert code == 0, err
    assert f"resumed from {ckpt.iter_dir(killed, first)}" in err

    a, b = logged_losses(straight), logged_losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 41))
    assert [a[i] for i in a] == [b[i] for i in a]  # bitwise: exact float equality
    wa, wb = _weights(straight, 40), _weights(killed, 40)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a[40] < a[1] - 1.0, "training lowers the loss"
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["summary"]["iterations"] == 40 and manifest["kind"] == "checkpoint"
    assert sorted(p.name for p in killed.glob("iter_*")) == ["iter_0000020", "iter_0000030",
                                                             "iter_0000040"]  # keep_last 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# DDP in fp32 on two ranks: tests/test_cluster.py::test_local_two_processes_match_inline
@pytest.mark.parametrize("mode,precision", [("fsdp", "fp32"), ("ddp", "bf16-master")])
def test_two_ranks_match_one_rank(dataset, tmp_path, mode, precision):
    """Equal up to summation order. bf16-master: each micro-batch's gradient is bf16 on one rank
    or two, each rank sums its two micro-batches in fp32 and the ranks' sums are averaged in fp32
    (one all-reduce after the micro-batches), as the one rank sums its four."""
    one = tmp_path / "one"
    code, _, err = _engine("pretrain", _spec(dataset, one, iters=6, data_parallel=mode,
                                             precision=precision), tmp_path)
    assert code == 0, err
    two = tmp_path / "two"
    port = str(_free_port())
    procs = [_engine("pretrain", _spec(dataset, two, iters=6, data_parallel=mode, precision=precision),
                     tmp_path,
                     env={"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                          "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}, wait=False)
             for r in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results[0][1] + results[1][1]
    a, b = logged_losses(one), logged_losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    # bf16-master measured 0 and 6e-11; without MasterAdamW's all-reduce, 0.13 in the loss
    assert max(abs(a[i] - b[i]) for i in a) < 1e-6
    wa, wb = _weights(one, 6), _weights(two, 6)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def test_sigterm_saves_then_resume_finishes(dataset, tmp_path):
    save = tmp_path / "run"
    spec = _spec(dataset, save, iters=3000, checkpoint={"interval": 1000})
    proc = _engine("pretrain", spec, tmp_path, wait=False)
    deadline = time.time() + 120
    while not (save / "metrics.jsonl").exists() or len(logged_losses(save)) < 3:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    stopped = ckpt.latest_iteration(save)
    assert stopped is not None and 3 <= stopped < 3000
    assert "run the same command again to resume" in err
    assert not (save / "manifest.json").exists(), "an interrupted run is not a complete artifact"
    code, _, err = _engine("pretrain", {**spec, "iters": stopped + 2}, tmp_path)
    assert code == 0, err
    assert json.loads((save / "manifest.json").read_text())["summary"]["iterations"] == stopped + 2


def test_non_finite_loss_stops_with_last_good_checkpoint(dataset, tmp_path):
    save = tmp_path / "diverge"
    spec = _spec(dataset, save, iters=30, max_nan_skips=2, checkpoint={"interval": 1},
                 optim={"lr": 1e30, "warmup_iters": 0, "min_lr": 0.0}, precision="fp32")
    # step 1 is computed on sane weights and then blows them up: every later loss is non-finite
    code, _, err = _engine("pretrain", spec, tmp_path)
    assert code == 2, err
    assert "non-finite in 3 consecutive steps at iteration 2" in err
    # iter_0000001's weights (after the blow-up) gave the non-finite loss: not a good checkpoint
    assert ckpt.latest_iteration(save) is None
    assert "Last good checkpoint: none" in err
    assert (save / "iter_0000001.nonfinite" / "meta.json").is_file()
    assert err.count("step skipped") == 3
    assert not (save / "manifest.json").exists()


def test_finetune_starts_fresh_from_weights(dataset, tmp_path):
    base = tmp_path / "base"
    code, _, err = _engine("pretrain", _spec(dataset, base, iters=20), tmp_path)
    assert code == 0, err
    tuned = tmp_path / "tuned"
    spec = _spec(dataset, tuned, iters=4, load=str(base))
    spec.pop("model")
    code, _, err = _engine("finetune", spec, tmp_path)
    assert code == 0, err
    assert json.loads((ckpt.iter_dir(tuned, 4) / "meta.json").read_text())["iteration"] == 4
    # first finetune loss is near the end of pretraining, far below a fresh model's
    assert logged_losses(tuned)[1] < logged_losses(base)[1] - 1.0
    code, _, err = _engine("finetune", _spec(dataset, tmp_path / "x", load=str(tmp_path)), tmp_path)
    assert code == 2 and "not a checkpoint" in err


@pytest.mark.parametrize("precision", ["bf16", "fp16", "bf16-master"])
def test_reduced_precision_trains_and_resumes(dataset, tmp_path, precision):
    """Autocast over fp32 weights (fp16 with loss scaling, its scale kept in the checkpoint), or
    bf16 weights with fp32 masters in the optimizer (4 micro-batches a step summed in fp32); the
    checkpoint holds fp32 weights either way, and a resumed run repeats the straight one."""
    from engine.train.loop import train

    save = tmp_path / precision
    train(PretrainSpec.model_validate(_spec(dataset, save, iters=8, precision=precision,
                                            checkpoint={"interval": 4})), "pretrain")
    losses = logged_losses(save)
    assert losses[8] < losses[1] - 0.5
    meta = json.loads((ckpt.iter_dir(save, 8) / "meta.json").read_text())
    assert ("grad_scaler" in meta) == (precision == "fp16")
    assert all(p.dtype == torch.float32 for p in _weights(save, 8).values())  # fp32 master weights

    resumed = tmp_path / f"{precision}-resumed"
    for iters in (4, 8):
        train(PretrainSpec.model_validate(_spec(dataset, resumed, iters=iters, precision=precision,
                                                checkpoint={"interval": 4})), "pretrain")
    assert logged_losses(resumed) == losses
    assert all(torch.equal(a, b) for a, b in zip(_weights(save, 8).values(),
                                                 _weights(resumed, 8).values()))


def test_master_weights_need_ddp(dataset, tmp_path):
    """The default precision follows the data parallelism; bf16-master asked for with FSDP is an
    error, not a silent switch."""
    def default(**over) -> str:
        spec = {k: v for k, v in _spec(dataset, tmp_path, **over).items() if k != "precision"}
        return PretrainSpec.model_validate(spec).precision

    assert default() == default(data_parallel="ddp") == "bf16-master"
    assert default(data_parallel="fsdp") == "bf16"
    with pytest.raises(ValueError, match="bf16-master needs data_parallel ddp"):
        PretrainSpec.model_validate(_spec(dataset, tmp_path, precision="bf16-master",
                                          data_parallel="fsdp"))


def test_eod_targets_are_masked(dataset, tmp_path):
    from engine.train.loop import Batches

    class Fixed:
        def __getitem__(self, i):
            import numpy as np
            return np.array([5, 2, 7, 2, 9])

    inputs, targets, mask = Batches(Fixed(), 1, 1, 0, 1, torch.device("cpu"), eod_id=2).micro(0, 0)
    assert inputs.tolist() == [[5, 2, 7, 2]] and targets.tolist() == [[2, 7, 2, 9]]
    assert mask.tolist() == [[False, True, False, True]]


def test_schedules_hand_computed():
    cos = LRSchedule(lr=1.0, min_lr=0.1, schedule="cosine", warmup_iters=10)
    assert cos.at(0, 110) == pytest.approx(0.1)          # warmup: (0+1)/10
    assert cos.at(9, 110) == pytest.approx(1.0)
    assert cos.at(60, 110) == pytest.approx(0.1 + 0.9 * 0.5)   # halfway through decay
    assert cos.at(110, 110) == pytest.approx(0.1)
    lin = LRSchedule(lr=2.0, min_lr=0.0, schedule="linear")
    assert lin.at(25, 100) == pytest.approx(1.5)
    wsd = LRSchedule(lr=1.0, min_lr=0.0, schedule="wsd", wsd_decay_fraction=0.2)
    assert wsd.at(79, 100) == 1.0 and wsd.at(90, 100) == pytest.approx(0.5)
    assert LRSchedule(lr=0.5, schedule="constant", warmup_iters=4).at(1, 9) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="min_lr"):
        LRSchedule(lr=0.1, min_lr=0.2)


def test_spec_errors_name_file_line_and_field(dataset, tmp_path):
    spec = _spec(dataset, tmp_path / "s")
    spec["optim"]["learning_rate"] = 0.1
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(spec, sort_keys=False))
    line = next(i for i, l in enumerate(cfg.read_text().splitlines(), 1) if "learning_rate" in l)
    with pytest.raises(SpecError, match=rf"bad\.yaml:{line}: optim\.learning_rate: Extra inputs"):
        load_spec(PretrainSpec, cfg)
    bad_model = _spec(dataset, tmp_path / "s", model={**MODEL, "num_kv_heads": 3})
    with pytest.raises(SpecError, match="model"):
        load_spec(PretrainSpec, None, bad_model)


def test_bad_batch_and_mismatched_checkpoint(dataset, tmp_path):
    from engine.train.loop import train

    with pytest.raises(InputError, match="not a multiple of micro_batch_size"):
        train(PretrainSpec.model_validate(_spec(dataset, tmp_path / "a", global_batch_size=7)), "pretrain")
    base = tmp_path / "base"
    train(PretrainSpec.model_validate(_spec(dataset, base, iters=2)), "pretrain")
    other = _spec(dataset, tmp_path / "b", load=str(base), model={**MODEL, "hidden_size": 32})
    with pytest.raises(InputError, match="architecture differs"):
        train(PretrainSpec.model_validate(other), "pretrain")
    # a checkpoint whose tensors do not fit its config
    path = ckpt.iter_dir(base, 2)
    cfg = json.loads((path / "model_config.json").read_text())
    (path / "model_config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    from_base = PretrainSpec.model_validate({**_spec(dataset, tmp_path / "c", load=str(base)),
                                             "model": None})
    with pytest.raises(InputError, match="model_config.json: .* the file is truncated or was changed"):
        train(from_base, "pretrain")  # the edit itself is caught by the recorded sizes/checksums
    meta = json.loads((path / "meta.json").read_text())
    meta["files"]["model_config.json"] = sha256_file(path / "model_config.json").model_dump()
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="does not fit the model"):
        train(from_base, "pretrain")
