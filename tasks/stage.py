"""The one Prefect task that runs any engine stage (engine/registry.py): a stage added to the
engine is a task at once (the registry says where its output goes), nothing written for it here.

In order: validate the spec with the engine's model; compute the stage's fingerprint (the one its
manifest will carry); place the output at `<home>/artifacts/<stage>/<fingerprint[:16]>` unless
the spec names one; return at once when a complete artifact with that fingerprint is there
(`force=True` rebuilds it); otherwise take the lease on that location, submit through cluster/
(transient submission failures retried), await the job without holding a thread while its log
lines stream into the task's log, and track it all in a nested MLflow run; publish a Prefect
table artifact; return an ArtifactRef. A failed job fails the task with the job's own error and
ends the MLflow run FAILED. A job that outlived the flow which submitted it (a Slurm job goes on
when its worker is killed: tasks/building.py) is followed by the next run instead of being
built a second time beside it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.runtime import flow_run, task_run

from cluster.jobs import Job, JobFailed
from cluster.profiles import Profile, load_profile
from cluster.resources import Resources
from engine.errors import InputError
from engine.manifest import complete, read_manifest
from engine.registry import get_stage
from engine.spec import StageSpec
from tasks.artifact import ArtifactRef
from tasks.building import forget_job, record_job, running_job
from tasks.lease import Lease
from tasks.options import validate_spec
from tasks.plan import log_prediction
from tasks.outputs import auto_location, given_location, lease_path, remove
from tasks.publish import publish
from tasks.run_inputs import Inputs
from tasks.submission import stop, submit_with_retries, wait_for, wait_limit_s
from tasks.tracking import StageRun, stage_label


def _task_run_name() -> str:
    return stage_label(task_run.get_parameters()["stage"])


@task(name="stage", task_run_name=_task_run_name, cache_policy=NO_CACHE)
async def run_stage(stage: str, spec: dict[str, Any] | StageSpec,
                    resources: Resources | dict[str, Any] | None = None,
                    profile: str | None = None, force: bool = False,
                    timeout_s: float | None = None, label: str | None = None) -> ArtifactRef:
    """Run `stage` with `spec` (its output field may be left out) on cluster `profile` (None:
    $LMFORGE_CLUSTER_PROFILE, else `local`) with `resources` overriding the profile's defaults;
    `timeout_s` bounds the wait (default: the job's time limits plus a day in the queue)."""
    log = get_run_logger()
    cluster = load_profile(profile)
    data = (spec.model_dump(mode="json", exclude_unset=True) if isinstance(spec, StageSpec)
            else dict(spec))
    # the profile's layout for what the spec leaves unnamed, before the fingerprint: data_parallel
    # is one of its fields (ddp or fsdp changes the default precision)
    data = {**cluster.layout.for_spec(get_stage(stage).spec, data), **data}
    fingerprint, inputs = await asyncio.to_thread(_inputs, stage, validate_spec(stage, data))
    location = given_location(stage, data) or auto_location(stage, fingerprint)
    checked = validate_spec(stage, data, location)
    wanted = cluster.resources.override(resources)
    timeout_s = timeout_s or wait_limit_s(cluster, wanted)

    if not force and (ref := await _cached(stage, fingerprint, inputs, location)):
        return ref
    lease = Lease(lease_path(location), owner={"flow_run": str(flow_run.get_id()), "stage": stage})
    if not lease.try_acquire():
        log.info("%s: %s is being built by %s; waiting for it", stage, location, lease.holder())
        await lease.acquire(timeout_s)
    heartbeat = asyncio.create_task(lease.heartbeat())
    try:
        if not force and (ref := await _cached(stage, fingerprint, inputs, location)):
            return ref  # the holder we waited for built it
        orphan = await asyncio.to_thread(running_job, location)
        if orphan is not None and not force:
            return await _adopt(stage, checked, location, *orphan, timeout_s)
        if orphan is not None:  # a forced rebuild must not write beside it
            await stop(orphan[0], log)
            forget_job(location)
        other = read_manifest(location)
        if other is not None and other.fingerprint != fingerprint and not force:
            raise InputError(f"{location} holds another {other.stage} artifact (fingerprint "
                             f"{other.fingerprint[:16]}, not {fingerprint[:16]}): choose another "
                             f"output, or force=True to replace it")
        # this artifact, damaged since it was built (a file missing or cut short): built again;
        # training stages resume from their own checkpoints instead
        damaged = other is not None and get_stage(stage).checkpoint_field is None
        if force or damaged:
            if damaged:
                log.warning("%s: %s is not complete (a file is missing or cut short): "
                            "building it again", stage, location)
            await asyncio.to_thread(remove, stage, location)
        return await _build(stage, checked, fingerprint, inputs, location, cluster, wanted,
                            timeout_s)
    finally:
        heartbeat.cancel()
        lease.release()


def _inputs(stage: str, spec: StageSpec) -> tuple[str, Inputs]:
    """The stage's fingerprint, and its inputs: name -> (path, fingerprint)."""
    fingerprint, fingerprints = get_stage(stage).fingerprint(spec)
    paths = get_stage(stage).input_paths(spec)
    return fingerprint, {name: (paths[name], fp) for name, fp in fingerprints.items()}


async def _cached(stage: str, fingerprint: str, inputs: Inputs,
                  location: str) -> ArtifactRef | None:
    """A reference to the complete artifact with this fingerprint at `location`, if there is
    one. The hit gets a short MLflow run of its own (tagged cached, linking the run that built
    it), so every flow run shows every stage."""
    manifest = complete(location)
    if manifest is None or manifest.fingerprint != fingerprint:
        return None
    run = await asyncio.to_thread(StageRun.start, stage, fingerprint, inputs, location, {}, True)
    await asyncio.to_thread(run.cached, fingerprint)
    ref = ArtifactRef.of(location, manifest, cached=True, mlflow_run_id=run.run_id)
    await publish(ref, run.link)
    get_run_logger().info("%s: cached, fingerprint %s at %s", stage, fingerprint[:16], location)
    return ref


async def _build(stage: str, spec: StageSpec, fingerprint: str, inputs: Inputs, location: str,
                 cluster: Profile, resources: Resources, timeout_s: float) -> ArtifactRef:
    plain = spec.model_dump(mode="json")
    run = await asyncio.to_thread(StageRun.start, stage, fingerprint, inputs, location, plain,
                                  False)
    await asyncio.to_thread(log_prediction, run.run_id, spec, resources)
    with_tracking = cluster.model_copy(update={"env": {**cluster.env, **run.job_env()}})
    try:
        job = await submit_with_retries(stage, spec, resources, with_tracking, get_run_logger())
    except BaseException as exc:
        _record_failure(run, exc, None)
        raise
    await asyncio.to_thread(record_job, location, job, mlflow_experiment=run.experiment,
                            mlflow_run=run.run_id, flow_run=str(flow_run.get_id()))
    return await _follow(stage, spec, location, job, run, timeout_s)


async def _adopt(stage: str, spec: StageSpec, location: str, job: Job, record: dict[str, Any],
                 timeout_s: float) -> ArtifactRef:
    """Follow the job of a flow that is gone, into the MLflow run it logs to."""
    get_run_logger().info("%s: job %s, submitted by flow run %s, is still running: following it",
                          stage, job.id, record.get("flow_run"))
    run = StageRun(record["mlflow_experiment"], record["mlflow_run"])
    await asyncio.to_thread(run.followed)
    return await _follow(stage, spec, location, job, run, timeout_s)


async def _follow(stage: str, spec: StageSpec, location: str, job: Job, run: StageRun,
                  timeout_s: float) -> ArtifactRef:
    """Wait for the job, complete its MLflow run, publish the artifact. Should this task end
    while the job runs on (its process killed), the job's record stays for the next run."""
    log = get_run_logger()
    try:
        await asyncio.to_thread(run.tag, job_id=job.id, job_dir=job.run.root)
        manifest = await wait_for(job, timeout_s, log)
    except BaseException as exc:
        if isinstance(exc, (JobFailed, TimeoutError, asyncio.CancelledError)):  # over, or cancelled
            forget_job(location)
        _record_failure(run, exc, job.run.rank_log(0))
        raise
    forget_job(location)
    plain = spec.model_dump(mode="json")
    metrics_file = Path(getattr(spec, "metrics_file", None) or Path(location) / "metrics.jsonl")
    await asyncio.to_thread(run.finished, stage, plain, manifest, location, metrics_file,
                            job.run.rank_log(0))
    ref = ArtifactRef.of(location, manifest, cached=False, mlflow_run_id=run.run_id,
                         job_dir=str(job.run.root))
    await publish(ref, run.link)
    log.info("%s: built %s (fingerprint %s)", stage, location, manifest.fingerprint[:16])
    return ref


def _record_failure(run: StageRun, error: BaseException, job_log: Path | None) -> None:
    try:
        run.failed(error, job_log)
    except Exception as tracking_error:  # noqa: BLE001 - the job's error is the one to raise
        get_run_logger().warning("could not record the failure in MLflow: %s", tracking_error)
