"""cluster/: engine stages as jobs — on the REAL Slurm test cluster (fixture `slurm_cluster`),
with the local executor (one process per rank on this machine) and inline (in this process).

Every wait has a deadline, and a test that gives up cancels its job first.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import pytest

from conftest import TINY_MODEL
from pydantic import ValidationError

from cluster.container import Container
from cluster.executors import slurm_parameters
from cluster.jobs import Job, JobFailed
from cluster.profiles import LayoutDefaults, ProfileError, load_profile
from cluster.resources import Resources
from cluster.submit import prepare, submit
from engine.errors import SpecError
from engine.manifest import read_manifest
from engine.train.spec import PretrainSpec, TrainSpec

MODEL = TINY_MODEL


@pytest.fixture(scope="module")
def dataset(tiny_dataset) -> str:
    return tiny_dataset


def _spec(dataset: str, save: Path, iters: int = 20, interval: int = 10) -> dict:
    return {"model": MODEL, "data": {"blend": [dataset], "split": "95,5,0", "seq_length": 32},
            "checkpoint": {"save": str(save), "interval": interval, "keep_last": 2},
            "iters": iters, "micro_batch_size": 2, "global_batch_size": 8, "precision": "fp32",
            "optim": {"lr": 3e-3, "warmup_iters": 3, "min_lr": 3e-4}, "log_interval": 1,
            "device": "cpu"}


def _losses(save: Path) -> dict[int, float]:
    """Step -> loss from metrics.jsonl (complete lines only); a step logged again after a resume
    keeps its last value."""
    try:
        text = (save / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return {}
    out = {}
    for line in text.splitlines(keepends=True):
        rec = json.loads(line) if line.endswith("\n") else {}
        if rec.get("kind") == "metrics" and "loss" in rec["data"]:
            out[rec["step"]] = rec["data"]["loss"]
    return out


def _sh(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def _until(what: str, condition, timeout_s: float, job: Job | None = None, every_s: float = 0.05):
    """Poll `condition()` until it returns something true; on timeout cancel the job and fail."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            info = ""
            if job is not None:
                tail = "\n".join(job.log_tail(15))
                info = f" (job {job.id} {job.state}; rank 0 log:\n{tail})"
                job.cancel()
            pytest.fail(f"no {what} after {timeout_s:.0f} s{info}", pytrace=False)
        time.sleep(every_s)
    return value


def _wait(job: Job, timeout_s: float, **kwargs):
    try:
        return job.wait_sync(timeout_s, poll_s=1.0, **kwargs)
    except TimeoutError:
        job.cancel()
        raise


@pytest.fixture(scope="module")
def inline_losses(dataset, tmp_path_factory) -> dict[int, float]:
    """The reference: 20 steps in this process (one rank)."""
    root = tmp_path_factory.mktemp("inline")
    job = submit("pretrain", _spec(dataset, root / "ckpt"), profile="inline", run_dir=root / "run")
    manifest = job.result()
    assert job.state == "COMPLETED" and manifest.summary["iterations"] == 20
    assert [a.reason for a in job.attempts] == ["submitted"]
    assert manifest.summary["attempts"][0]["start_step"] == 0
    assert any("iter 20/20" in line for line in job.log_lines())
    return _losses(root / "ckpt")


# ---------------------------------------------------------------- profiles, resources, specs
def test_profile_unknown_field_names_file_and_line(tmp_path):
    bad = tmp_path / "site.yaml"
    bad.write_text("executor: slurm\nslurm:\n  partition: debug\n  partiton: gpu\n")
    with pytest.raises(ProfileError, match=r"site\.yaml:4: slurm\.partiton: Extra inputs are not "
                                           r"permitted"):
        load_profile(bad)
    bad.write_text("executor: local\nresources:\n  nodes: 0\n")
    with pytest.raises(ProfileError, match=r"site\.yaml:3: resources\.nodes: Input should be greater"):
        load_profile(bad)
    with pytest.raises(ProfileError, match="unknown cluster profile 'nope'.*testcluster"):
        load_profile("nope")
    for name in ("local", "inline", "testcluster", "gpu-cluster"):  # the shipped examples load
        assert load_profile(name).executor in ("local", "inline", "slurm")


def test_bad_requests_fail_before_anything_runs(dataset, tmp_path):
    with pytest.raises(ValidationError, match="one rank per GPU"):
        Resources(gpus_per_node=4, tasks_per_node=2)
    run = tmp_path / "run"
    with pytest.raises(SpecError, match=r"<pretrain spec>: optim\.learning_rate: Extra inputs"):
        submit("pretrain", {**_spec(dataset, tmp_path / "s"), "optim": {"learning_rate": 1}},
               profile="local", run_dir=run)
    with pytest.raises(ProfileError, match="inline runs one rank in this process, not 2"):
        submit("pretrain", _spec(dataset, tmp_path / "s"), {"tasks_per_node": 2}, "inline", run)
    with pytest.raises(ProfileError, match="nodes must be 1, not 2"):
        submit("pretrain", _spec(dataset, tmp_path / "s"), {"nodes": 2}, "local", run)
    with pytest.raises(ProfileError, match=r"local\.yaml:\d+: requeue\.signal_delay_s \(60 s\) must "
                                           r"be shorter than the time limit \(1 min\)"):
        submit("pretrain", _spec(dataset, tmp_path / "s"), {"time_min": 1}, "local", run)
    assert not run.exists(), "nothing is written before the checks pass"


def test_gpu_profile_becomes_sbatch_and_srun_options():
    profile = load_profile("gpu-cluster")
    params = slurm_parameters(profile, profile.resources.override({"nodes": 4}), "lmforge-pretrain")
    assert {k: params[k] for k in ("nodes", "ntasks_per_node", "gpus_per_node", "cpus_per_task",
                                   "partition", "account", "qos", "constraint", "exclusive",
                                   "signal_delay_s", "time")} == {
        "nodes": 4, "ntasks_per_node": 8, "gpus_per_node": 8, "cpus_per_task": 12,
        "partition": "gpu", "account": "my-project", "qos": "normal", "constraint": "h100",
        "exclusive": True, "signal_delay_s": 300, "time": 1440}
    assert params["srun_args"] == ["--kill-on-bad-exit=1",
                                   "--container-image=/shared/images/lmforge-0.1.0.sqsh",
                                   "--container-mounts=/shared:/shared",
                                   "--container-workdir=/shared/lmforge", "--cpu-bind=none"]
    assert params["additional_parameters"] == {"requeue": True, "comment": "lmforge"}
    assert params["setup"] == ["export LMFORGE_HOME=/shared/$USER/lmforge"]


def test_profile_layout_defaults_fill_what_the_spec_leaves(tmp_path):
    """A profile's layout reaches the spec where the spec names no value (before its validation)
    and the world-size check with the profile's resources; never a stage that does not train."""
    assert set(LayoutDefaults.model_fields) < set(TrainSpec.model_fields)
    site = tmp_path / "site.yaml"
    site.write_text("executor: local\nresources:\n  tasks_per_node: 2\nlayout:\n"
                    "  tensor_parallel: 2\n  recompute: selective\n")
    spec = _spec("/data/ds", tmp_path / "s")
    taken, resources, _ = prepare("pretrain", spec, None, site)
    assert (taken.tensor_parallel, taken.recompute, resources.world_size) == (2, "selective", 2)
    mine, _, _ = prepare("pretrain", {**spec, "tensor_parallel": 1}, None, site)
    assert (mine.tensor_parallel, mine.recompute) == (1, "selective")  # the spec's value wins
    model = PretrainSpec.model_validate(spec)  # a spec model: its unset fields take the defaults
    assert prepare("pretrain", model, None, site)[0].tensor_parallel == 2
    fsdp = load_profile(site).model_copy(update={"layout": LayoutDefaults(data_parallel="fsdp")})
    no_precision = {k: v for k, v in spec.items() if k != "precision"}
    assert prepare("pretrain", no_precision, None, fsdp)[0].precision == "bf16"  # fsdp's default
    convert = {"load_dir": "/m", "save_dir": str(tmp_path / "c"), "source_format": "native",
               "target_format": "megatron"}  # its tensor_parallel is the layout it writes
    assert prepare("convert", convert, None, site)[0].tensor_parallel == 1
    with pytest.raises(SpecError, match=r"pretrain on 3 rank\(s\): world size 3 is not a "
                       r"multiple of tensor_parallel 2 .* \(with tensor_parallel 2, recompute "
                       r"selective from the profile's layout, .*site\.yaml:5\)"):
        submit("pretrain", spec, {"tasks_per_node": 3}, site, tmp_path / "run")
    with pytest.raises(SpecError, match=r"num_kv_heads 2 is not divisible by tensor_parallel 4"):
        prepare("pretrain", {**spec, "tensor_parallel": 4}, None, site)
    site.write_text("executor: local\nlayout:\n  tensor_parallel: 0\n")
    with pytest.raises(ProfileError, match=r"site\.yaml:3: layout\.tensor_parallel: Input should "
                                           r"be greater than or equal to 1"):
        prepare("pretrain", spec, None, site)
    assert not (tmp_path / "run").exists()
    assert load_profile("gpu-cluster").layout.tensor_parallel == 8


# ---------------------------------------------------------------- local executor
@pytest.mark.timeout(150)
def test_local_two_processes_match_inline(dataset, inline_losses, tmp_path):
    job = submit("pretrain", _spec(dataset, tmp_path / "ckpt"), {"tasks_per_node": 2}, "local",
                 run_dir=tmp_path / "run")
    manifest = _wait(job, 120)
    losses = _losses(tmp_path / "ckpt")
    assert sorted(losses) == sorted(inline_losses) == list(range(1, 21))
    assert max(abs(losses[i] - inline_losses[i]) for i in losses) < 1e-6
    assert job.state == "COMPLETED" and manifest.summary["iterations"] == 20
    assert read_manifest(tmp_path / "ckpt").summary["attempts"] == manifest.summary["attempts"]
    assert job.log_tail(50, rank=1)[0].startswith("[cluster] rank 1/2")


# ---------------------------------------------------------------- Slurm
@pytest.mark.slow
@pytest.mark.timeout(150)
def test_slurm_two_nodes_ddp_streams_logs_and_writes_manifest(slurm_cluster, dataset,
                                                              inline_losses, tmp_path):
    save = tmp_path / "ckpt"
    job = submit("pretrain", _spec(dataset, save), {"nodes": 2}, "testcluster",
                 run_dir=tmp_path / "run")
    lines: list[str] = []
    try:
        manifest = asyncio.run(job.wait(120, on_line=lines.append, poll_s=1.0))
    except TimeoutError:
        job.cancel()
        raise
    assert job.state == "COMPLETED"
    assert lines[0].startswith(f"[cluster] rank 0/2 on n1, job {job.id}: attempt 1 (submitted)")
    assert any("iter 20/20" in line for line in lines), lines[-5:]
    assert job.log_tail(50, rank=1)[0].startswith("[cluster] rank 1/2 on n2")
    on_disk = read_manifest(save)
    assert on_disk == manifest and manifest.summary["iterations"] == 20
    assert [(a["number"], a["reason"], a["start_step"], a["host"])
            for a in on_disk.summary["attempts"]] == [(1, "submitted", 0, "n1")]
    params = json.loads((save / "metrics.jsonl").read_text().splitlines()[0])
    assert params["kind"] == "params" and params["data"]["world_size"] == 2
    losses = _losses(save)  # gloo DDP across "nodes" n1 and n2 = one rank
    assert max(abs(losses[i] - inline_losses[i]) for i in inline_losses) < 1e-6


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_slurm_job_runs_its_engines_in_the_image(slurm_cluster, node_image, dataset,
                                                 inline_losses, tmp_path_factory):
    """A 2-node job whose profile names the built image (runtime podman): each rank's launcher
    starts its engine in a container of the image (podman's events list one per rank), the
    ranks meet over gloo, and the losses are the inline run's. A run folder outside the mounts
    is refused before anything is written."""
    shared = tmp_path_factory.getbasetemp()  # the dataset and this test's folders
    work = tmp_path_factory.mktemp("in-image")
    profile = load_profile("testcluster").model_copy(update={"container": Container(
        runtime="podman", image=node_image["tag"], mounts=[f"{shared}:{shared}"],
        options=node_image["podman_options"])})
    with pytest.raises(ProfileError, match="run folder /elsewhere/run is not mounted"):
        submit("pretrain", _spec(dataset, work / "x"), {"nodes": 2}, profile,
               run_dir="/elsewhere/run")
    since = str(int(time.time()))
    job = submit("pretrain", _spec(dataset, work / "ckpt"), {"nodes": 2}, profile,
                 run_dir=work / "run")
    manifest = _wait(job, 300)
    assert job.state == "COMPLETED" and manifest.summary["iterations"] == 20
    names = [job.log_tail(200, rank=r)[0].rsplit(", in ", 1)[1] for r in (0, 1)]
    assert all(n.startswith(f"lmforge-{job.id}-{r}-") for r, n in enumerate(names)), names
    started = _sh("podman", "events", "--since", since, "--stream=false", "--filter",
                  "event=start", "--format", "{{.Name}}").stdout.split()
    assert set(names) <= set(started), (names, started)
    losses = _losses(work / "ckpt")
    assert max(abs(losses[i] - inline_losses[i]) for i in inline_losses) < 1e-6


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_slurm_tensor_parallel_across_two_nodes_matches_inline(slurm_cluster, dataset,
                                                              inline_losses, tmp_path):
    """TP 2 over n1 and n2 (one rank each), from the profile's layout: the spec names none."""
    profile = load_profile("testcluster")
    profile = profile.model_copy(update={"layout": LayoutDefaults(tensor_parallel=2)})
    save = tmp_path / "ckpt"
    job = submit("pretrain", _spec(dataset, save), {"nodes": 2}, profile, run_dir=tmp_path / "run")
    manifest = _wait(job, 120)
    assert job.state == "COMPLETED" and manifest.summary["iterations"] == 20
    assert job.log_tail(50, rank=1)[0].startswith("[cluster] rank 1/2 on n2")
    params = json.loads((save / "metrics.jsonl").read_text().splitlines()[0])["data"]
    assert (params["tensor_parallel"], params["world_size"]) == (2, 2)
    assert params["layout"] == "pp 1 × dp_replicate 1 × dp_shard 1 × cp 1 × tp 2"
    losses = _losses(save)
    assert sorted(losses) == sorted(inline_losses)
    assert max(abs(losses[i] - inline_losses[i]) for i in inline_losses) < 1e-5


@pytest.mark.slow
def test_slurm_profile_checked_against_sinfo(slurm_cluster, dataset, tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("executor: slurm\nresources:\n  time_min: 5\nslurm:\n  partition: gpu\n")
    with pytest.raises(ProfileError, match=r"site\.yaml:5: slurm\.partition: unknown partition "
                                           r"'gpu'; sinfo lists debug"):
        submit("pretrain", _spec(dataset, tmp_path / "s"), profile=site, run_dir=tmp_path / "run")
    with pytest.raises(ProfileError, match="3 nodes asked for, but partition 'debug' has 2"):
        submit("pretrain", _spec(dataset, tmp_path / "s"), {"nodes": 3}, "testcluster",
               run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_slurm_failure_raises_with_the_engine_error(slurm_cluster, tmp_path):
    job = submit("pretrain", _spec(str(tmp_path / "missing" / "data"), tmp_path / "ckpt"),
                 profile="testcluster", run_dir=tmp_path / "run")
    with pytest.raises(JobFailed) as failed:
        _wait(job, 90)
    text = str(failed.value)
    assert f"job {job.id} (pretrain) FAILED: rank 0 on n1: the engine exited with status 2" in text
    assert f"data.blend.0: no such file or folder: {tmp_path}/missing/data" in text, text
    assert failed.value.state == "FAILED" and failed.value.rank == 0


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_job_waiting_in_slurms_queue_says_why(slurm_cluster, tmp_path):
    """Submitted held, the job pends; the caller's log says so and why, once, then the job runs
    when released."""
    profile = load_profile("testcluster")
    held = profile.model_copy(update={"slurm": profile.slurm.model_copy(
        update={"sbatch": {"hold": True}})})
    job = submit("generate-corpus", {"output": str(tmp_path / "corpus"), "documents": 10},
                 profile=held, run_dir=tmp_path / "run")
    lines: list[str] = []
    _until("news of the wait", lambda: lines.extend(job.log_lines()) or
           any("waiting in Slurm's queue" in line for line in lines), 30, job)
    assert f"[cluster] job {job.id} is waiting in Slurm's queue (reason: JobHeldUser)" in lines
    assert _sh("scontrol", "release", job.id).returncode == 0
    _wait(job, 60, on_line=lines.append)
    assert sum("waiting in Slurm's queue" in line for line in lines) == 1


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_scancel_is_reported_as_cancelled_within_seconds(slurm_cluster, dataset, tmp_path):
    job = submit("pretrain", _spec(dataset, tmp_path / "ckpt", iters=100_000, interval=100_000),
                 profile="testcluster", run_dir=tmp_path / "run")
    _until("training", lambda: _losses(tmp_path / "ckpt"), 90, job)
    assert _sh("scancel", job.id).returncode == 0
    t0 = time.monotonic()
    with pytest.raises(JobFailed, match=rf"job {job.id} \(pretrain\) CANCELLED: cancelled") as failed:
        _wait(job, 30)
    assert failed.value.state == "CANCELLED" and time.monotonic() - t0 < 30


def _restart_requeued(job: Job) -> None:
    """Slurm holds a requeued job ~2 min (EligibleTime); `StartTime=now` lifts that, but only
    ~10 s after the requeue ("Job credential revoked" before)."""
    time.sleep(8)
    _until("restart of the requeued job",
           lambda: _sh("scontrol", "update", f"JobId={job.id}", "StartTime=now").returncode == 0,
           60, job, every_s=2)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_requeue_resumes_and_matches_an_uninterrupted_run_bitwise(slurm_cluster, dataset, tmp_path):
    iters = 300
    # the uninterrupted reference runs meanwhile on this machine, through the same bootstrap
    straight = submit("pretrain", _spec(dataset, tmp_path / "straight", iters, interval=100),
                      profile="local", run_dir=tmp_path / "straight-run")
    save = tmp_path / "ckpt"
    job = submit("pretrain", _spec(dataset, save, iters, interval=100), profile="testcluster",
                 run_dir=tmp_path / "run")
    # 1: Slurm's own requeue (SIGTERM to every process, then requeue), as on preemption
    _until("step 20", lambda: max(_losses(save), default=0) >= 20, 90, job)
    assert _sh("scontrol", "requeue", job.id).returncode == 0
    _restart_requeued(job)
    _until("the second attempt", lambda: len(job.attempts) == 2, 60, job)
    first_stop = job.attempts[1].start_step
    # 2: USR2 through submitit's handler (as before a time limit): checkpoint(), then requeue
    _until("progress after the resume", lambda: max(_losses(save), default=0) >= first_stop + 20,
           90, job)
    assert _sh("scancel", "--signal=USR2", job.id).returncode == 0
    _restart_requeued(job)
    manifest = _wait(job, 120)

    attempts = [(a.number, a.reason) for a in job.attempts]
    assert attempts == [(1, "submitted"), (2, "preempted"), (3, "preempted")]
    starts = [a.start_step for a in job.attempts]
    assert 0 == starts[0] < 20 <= starts[1] < starts[1] + 20 <= starts[2] < iters
    assert [a["number"] for a in read_manifest(save).summary["attempts"]] == [1, 2, 3]
    assert manifest.summary["iterations"] == iters

    _wait(straight, 120)
    a, b = _losses(tmp_path / "straight"), _losses(save)
    assert sorted(a) == sorted(b) == list(range(1, iters + 1))
    assert [a[i] for i in a] == [b[i] for i in a]  # bitwise: exact float equality
