"""Fault injection on real engine processes (forked by tests/fault_runner.py): SIGKILL at every
phase of a checkpoint save and prune, a re-run of a finished run, stop signals at start-up and in
the final save, NaN in every precision, full disks, corrupted checkpoints. After each fault, what
is on disk must be complete or clearly not, and running the same command again must finish with
weights and losses bitwise equal to a run that saw no fault."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_MODEL, forked_engine, logged_losses
from engine.manifest import complete
from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel
from engine.checkpoint import store as ckpt

CK = "engine.checkpoint.store"
RUNS = [(1, "fp32"), (2, "bf16-master")]  # (seed, precision), alternated over the faults


def _spec(dataset: str, save: Path, seed: int, precision: str, **over) -> dict:
    spec = {"model": TINY_MODEL, "data": {"blend": [dataset], "split": "95,5,0", "seq_length": 32},
            "checkpoint": {"save": str(save), "interval": 2, "keep_last": 1},
            "iters": 6, "micro_batch_size": 2, "global_batch_size": 8, "precision": precision,
            "seed": seed, "optim": {"lr": 3e-3, "warmup_iters": 2, "min_lr": 3e-4},
            "log_interval": 1, "device": "cpu"}
    spec.update(over)
    return spec


def run_engine(stage: str, spec: dict | list[str], tmp: Path, *faults: str,
               timeout: float = 300) -> tuple[int, str, float]:
    """(exit status — negative for a signal —, stderr, seconds) of `stage` under `faults`."""
    if isinstance(spec, dict):
        cfg = tmp / f"{stage}-{time.monotonic_ns()}.yaml"
        cfg.write_text(yaml.safe_dump(spec))
        spec = ["--config", str(cfg)]
    start = time.monotonic()
    proc = forked_engine([stage, *spec], faults)
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.returncode is None:  # timed out: do not leave it running
            proc.send_signal(signal.SIGKILL)
    return proc.returncode, err, time.monotonic() - start


def _weights(path: Path) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = LlamaModel(ModelConfig.model_validate(ckpt.read_model_config(path)))
    model.to_empty(device="cpu")
    ckpt.load_checkpoint(path, model)
    return model.state_dict()


def assert_consistent(save: Path) -> None:
    """Nothing that looks complete is not: every iter_N folder with a meta.json is complete, and
    the latest file names a complete checkpoint (or nothing was saved yet)."""
    for path in save.glob("iter_*"):
        if (path / "meta.json").is_file() and not path.name.endswith((".tmp", ".removing")):
            assert ckpt.is_complete(path), f"{path} has meta.json but is not complete"
    if ckpt.latest_iteration(save) is not None:
        assert ckpt.is_complete(ckpt.checkpoint_path(save))
    manifest = save / "manifest.json"
    assert not manifest.exists() or complete(save), "a manifest over an incomplete checkpoint"


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory) -> dict:
    """Runs that saw no fault, one per (seed, precision): their losses and final weights."""
    out = {}
    for seed, precision in RUNS:
        save = tmp_path_factory.mktemp("ref") / "run"
        code, err, _ = run_engine("pretrain", _spec(tiny_dataset, save, seed, precision), save.parent)
        assert code == 0, err
        out[seed, precision] = (logged_losses(save), _weights(ckpt.checkpoint_path(save)))
    return out


def _assert_equal_to_reference(save: Path, ref) -> None:
    losses, weights = ref
    assert logged_losses(save) == losses
    final = _weights(ckpt.checkpoint_path(save))
    assert all(torch.equal(final[k], weights[k]) for k in weights)
    assert complete(save) and complete(save).summary["iterations"] == 6
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000006"]  # keep_last 1, no leftovers


# Saves happen at iterations 2, 4 and 6; each hashes its rank's files, then rank 0 the rest
# (`_hash` twice), and writes model_config.json, meta.json and the latest file. The faults below
# hit the second save (iteration 4), whose prune removes iter_0000002.
SAVE_PHASES = {
    "before the shards": f"kill@{CK}:_write_shards#2",
    "after the shards, before their hashes": f"kill@{CK}:_hash#3",
    "before meta.json": f"kill@{CK}:_commit#2",
    "after meta.json, before the rename": f"kill@{CK}:atomic_write_text#5+",
    "after the rename, before latest": f"kill@{CK}:fsync_dir#3",
    "after latest, before the prune": f"kill@{CK}:_point_latest#2+",
    "in the prune, after its rename": f"kill@{CK}:_rename_aside#1+",
    "mid-step": "kill@engine.train.loop:_loss_sum#15",
}


@pytest.mark.slow
@pytest.mark.parametrize("phase", list(SAVE_PHASES), ids=list(SAVE_PHASES))
def test_kill_at_each_save_phase_then_resume_is_exact(phase, tiny_dataset, reference, tmp_path):
    seed, precision = RUNS[list(SAVE_PHASES).index(phase) % len(RUNS)]
    save = tmp_path / "run"
    spec = _spec(tiny_dataset, save, seed, precision)
    code, err, _ = run_engine("pretrain", spec, tmp_path, SAVE_PHASES[phase])
    assert code == -signal.SIGKILL, f"the fault was not reached: {err[-2000:]}"
    assert_consistent(save)
    code, err, _ = run_engine("pretrain", spec, tmp_path)
    assert code == 0, err
    _assert_equal_to_reference(save, reference[seed, precision])


@pytest.mark.slow
def test_rerun_of_a_finished_run_changes_nothing(tiny_dataset, reference, tmp_path):
    save = tmp_path / "run"
    spec = _spec(tiny_dataset, save, *RUNS[0])
    assert run_engine("pretrain", spec, tmp_path)[0] == 0
    before = (save / "manifest.json").read_text()
    # a requeue of the finished job: nothing is saved, so a kill in a save cannot happen
    code, err, _ = run_engine("pretrain", spec, tmp_path, f"kill@{CK}:save_checkpoint")
    assert code == 0 and "already finished" in err, err
    assert (save / "manifest.json").read_text() == before
    # killed after the final save but before its manifest: the re-run keeps the checkpoint
    (save / "manifest.json").unlink()
    code, err, _ = run_engine("pretrain", spec, tmp_path, f"kill@{CK}:_point_latest")
    assert code == -signal.SIGKILL, err
    assert_consistent(save)
    assert ckpt.is_complete(save / "iter_0000006")
    code, err, _ = run_engine("pretrain", spec, tmp_path)
    assert code == 0, err
    _assert_equal_to_reference(save, reference[RUNS[0]])


@pytest.mark.slow
@pytest.mark.parametrize("where", ["start-up", "final save"])
def test_stop_signal_at_start_up_and_in_the_final_save(where, tiny_dataset, reference, tmp_path):
    save = tmp_path / "run"
    spec = _spec(tiny_dataset, save, *RUNS[1])
    if where == "start-up":
        code, err, _ = run_engine("pretrain", spec, tmp_path, "term@engine.train.loop:build_samples")
        assert code == 75 and "received during start-up" in err, err
        assert ckpt.latest_iteration(save) is None
        code, err, _ = run_engine("pretrain", spec, tmp_path)
        assert code == 0, err
    else:  # the signal arrives while the last checkpoint is written: it is finished, not lost
        code, err, _ = run_engine("pretrain", spec, tmp_path, f"term@{CK}:_write_shards#3")
        assert code == 0, err
    _assert_equal_to_reference(save, reference[RUNS[1]])


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "bf16-master"])
def test_nan_stops_every_precision_and_keeps_only_good_checkpoints(precision, tiny_dataset, tmp_path):
    save = tmp_path / "run"
    spec = _spec(tiny_dataset, save, 1, precision, max_nan_skips=2,
                 checkpoint={"save": str(save), "interval": 2, "keep_last": 2})
    # 4 micro-batches a step: the loss of step 5 on is NaN, computed from iter_0000004's weights
    code, err, _ = run_engine("pretrain", spec, tmp_path, "nan@engine.train.loop:_loss_sum#17+")
    assert code == 2, err
    assert "non-finite in 3 consecutive steps at iteration 5" in err
    assert f"Last good checkpoint: {save / 'iter_0000002'}" in err
    assert ckpt.latest_iteration(save) == 2 and ckpt.is_complete(save / "iter_0000002")
    assert (save / "iter_0000004.nonfinite").is_dir() and not (save / "manifest.json").exists()


@pytest.mark.slow
def test_one_nan_batch_is_skipped_and_the_run_finishes(tiny_dataset, tmp_path):
    save = tmp_path / "run"
    spec = _spec(tiny_dataset, save, 1, "fp16")
    code, err, _ = run_engine("pretrain", spec, tmp_path, "nan1@engine.train.loop:_loss_sum#9+")
    assert code == 0, err
    assert err.count("step skipped (1/3)") == 1 and complete(save)


@pytest.fixture
def full_disk(tmp_path):
    """A folder on a 1 MiB tmpfs, filled but for `free` bytes: disk(free) -> the folder."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the full-disk tests mount a tmpfs: they need root, and CI is set")
        pytest.skip("the full-disk tests mount a tmpfs: they need root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)

    def disk(free: int) -> Path:
        (mount / "filler").write_bytes(b"\0" * (os.statvfs(mount).f_bavail * 4096 - free))
        (mount / "out").mkdir()
        return mount / "out"
    yield disk
    subprocess.run(["umount", str(mount)], check=True)


def _disk_cases(fx: dict, out: Path, tmp: Path) -> dict[str, list[str]]:
    spec = tmp / "pretrain.yaml"
    spec.write_text(yaml.safe_dump(_spec(fx["dataset"], out / "run", 1, "fp32", iters=2)))
    return {
        "generate-corpus": ["--output", str(out / "corpus"), "--documents", "300"],
        "train-tokenizer": ["--input", str(fx["corpus"]), "--output", str(out / "tok")],
        "tokenize": ["--input", str(fx["corpus"]), "--output-prefix", str(out / "data"),
                     "--tokenizer-model", str(fx["tokenizer"]), "--no-progress"],
        "merge": ["--input", fx["dataset"], fx["dataset"], "--output-prefix", str(out / "both")],
        "pretrain": ["--config", str(spec)],
        "convert": ["--load-dir", str(fx["checkpoint"]), "--save-dir", str(out / "hf"),
                    "--source-format", "native", "--target-format", "hf"],
        "reshard": ["--input", str(fx["checkpoint"]), "--output", str(out / "resharded"),
                    "--device", "cpu"],
        "evaluate": ["--load-dir", str(fx["hf_model"]), "--tokenizer", str(fx["tokenizer"]),
                     "--output", str(out / "report"),
                     "--ppl", str(fx["corpus"] / "stories-000.jsonl"), "--device", "cpu",
                     "--no-progress"],
    }


@pytest.mark.parametrize("stage", ["generate-corpus", "train-tokenizer", "tokenize", "merge",
                                   "pretrain", "convert", "reshard", "evaluate"])
def test_full_disk_in_every_writing_stage(stage, full_disk, fixtures, tmp_path, capsys):
    from engine.__main__ import main

    out = full_disk(2048)
    code = main([stage, *_disk_cases(fixtures, out, tmp_path)[stage]])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "no space left on the device while writing it" in err and "Traceback" not in err, err
    left = sorted(p.name for p in out.rglob("*"))
    assert [name for name in left if ".tmp" in name or name.endswith(".manifest.json")] == []
    assert left == (["metrics.jsonl", "run"] if stage == "pretrain" else [])


@pytest.mark.slow
def test_temporaries_of_a_killed_writer_are_removed_by_the_next(fixtures, tmp_path):
    argv = ["--input", str(fixtures["corpus"]), "--output-prefix", str(tmp_path / "data"),
            "--tokenizer-model", str(fixtures["tokenizer"]), "--batch-lines", "50", "--no-progress"]
    code, err, _ = run_engine("tokenize", argv, tmp_path,
                              "kill@engine.data.indexed:IndexedDatasetWriter.add_documents#3")
    assert code == -signal.SIGKILL, err
    assert [p.name for p in tmp_path.glob("data*.tmp-*")], "the killed writer left no temporary"
    code, err, _ = run_engine("tokenize", argv, tmp_path)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.glob("data*")) == [
        "data.manifest.json", "data_text_document.bin", "data_text_document.idx"]


@pytest.mark.slow
def test_stop_signal_in_a_stage_without_checkpoints_removes_its_output(fixtures, tmp_path):
    argv = ["--load-dir", str(fixtures["checkpoint"]), "--save-dir", str(tmp_path / "hf"),
            "--source-format", "native", "--target-format", "hf"]
    for fault in ("term@engine.registry:get_stage", "term@engine.convert.stage:verify"):
        # while the stage's modules are imported (start-up), and in the middle of its work
        code, err, _ = run_engine("convert", argv, tmp_path, fault)
        assert code == 75 and "stopped: SIGTERM; run the same command again" in err, err
        assert list(tmp_path.glob("hf*")) == []


def test_leftovers_of_old_damage_are_swept_and_readers_fall_back(tmp_path, caplog):
    cfg = ModelConfig(**TINY_MODEL)
    model = LlamaModel(cfg)
    model.init_weights(0)

    def save(iteration: int) -> Path:
        return ckpt.save_checkpoint(tmp_path, iteration, model, None, {}, cfg.model_dump())

    save(1)
    save(2)
    (save(3) / "__0_0.distcp").unlink()  # damage after the fact: latest names an incomplete one
    assert ckpt.checkpoint_path(tmp_path) == tmp_path / "iter_0000002"
    assert "using " + str(tmp_path / "iter_0000002") in caplog.text
    (tmp_path / "iter_0000004" / "rng").mkdir(parents=True)  # a folder holding only rng/
    (tmp_path / "iter_0000001.removing").mkdir()
    save(5)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == [
        "iter_0000001", "iter_0000002", "iter_0000005"]
    ckpt.save_checkpoint(tmp_path, 6, model, None, {}, cfg.model_dump(), keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000005", "iter_0000006"]
