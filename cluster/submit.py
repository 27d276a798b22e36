"""`submit(stage, spec, resources, profile) -> Job`: run one engine stage as a job.

Everything is checked before anything is queued — the spec against its stage's model, the
profile's fields, the resources against the profile and (for Slurm) the live cluster — and
the run folder (cluster/layout.py) is written before the job starts.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cluster.bootstrap import RankLauncher
from cluster.executors import make_executor
from cluster.inline import run_inline
from cluster.jobs import Job
from cluster.layout import RunDir
from cluster.preflight import check
from cluster.profiles import Profile, ProfileError, load_profile
from cluster.resources import Resources
from engine.errors import Preempted, SpecError
from engine.plan.check import check_fits
from engine.registry import get_stage
from engine.spec import StageSpec, dump_spec, format_validation_error
from engine.train.spec import TrainSpec


def submit(stage: str, spec: dict[str, Any] | StageSpec, resources: Resources | dict | None = None,
           profile: Profile | str | Path | None = None, run_dir: str | Path | None = None) -> Job:
    """Submit `stage` with `spec`. `resources` override the profile's defaults field by field;
    `profile` is a Profile, a shipped profile's name, a YAML path, or None for the default
    ($LMFORGE_CLUSTER_PROFILE, else `local`). `run_dir` defaults to a new folder under the
    profile's runs_dir."""
    entry = get_stage(stage)
    spec, resources, profile = prepare(stage, spec, resources, profile, preflight=True)
    root = Path(run_dir or profile.runs_root() / RunDir.new_name(stage))
    if profile.container and not profile.container.shows(root):
        raise ProfileError(f"{profile.where('container', 'mounts')}: the job's run folder {root} "
                           f"is not mounted in the container at its own path: add a mount "
                           f"SRC:SRC over it to container.mounts")
    run = RunDir.create(root)
    run.spec.write_text(dump_spec(spec) + "\n", encoding="utf-8")
    checkpoint_dir = entry.checkpoint_dir(spec)
    artifact = entry.output(spec)  # the manifest to rewrite with the attempts (docs/cluster.md)
    record = {"stage": stage, "executor": profile.executor, "profile": profile.source,
              "resources": resources.model_dump(), "submitted_at": _now()}
    if profile.executor == "inline":
        job = _inline(stage, spec, run, profile, checkpoint_dir, artifact)
    else:
        launcher = RankLauncher(stage, str(run.root), profile.environment(), resources.cpus_per_task,
                                resources.time_min * 60, profile.requeue.signal_delay_s,
                                checkpoint_dir, artifact, profile.container,
                                resources.gpus_per_node > 0)
        executor = make_executor(profile, resources, run, job_name=f"lmforge-{stage}")
        job = Job(run, stage, profile.executor, submitted=executor.submit(launcher))
    run.write_json(run.job, {**record, "job_id": job.id})
    return job


def prepare(stage: str, spec: dict[str, Any] | StageSpec, resources: Resources | dict | None = None,
            profile: Profile | str | Path | None = None,
            preflight: bool = False) -> tuple[StageSpec, Resources, Profile]:
    """What `submit` checks (a flow's dry run does this for every stage): the profile; the spec,
    with the profile's layout defaults for the fields it does not name; the resources, with
    `preflight` also against the executor and the live cluster (cluster/preflight.py); and that
    the spec's layout divides their world size."""
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    spec, defaults = _validated(stage, spec, profile)
    resources = profile.resources.override(resources)
    if preflight:
        check(profile, resources)
    try:
        spec.check_world(resources.world_size)
    except ValueError as exc:
        raise SpecError(f"{stage} on {resources.world_size} rank(s): {exc}"
                        f"{_from_profile(profile, defaults)}") from None
    if resources.gpu and isinstance(spec, TrainSpec):
        try:
            check_fits(spec, resources.world_size, resources.gpu, resources.ranks_per_node)
        except SpecError as exc:
            raise SpecError(f"{stage}: {exc}{_from_profile(profile, defaults)}") from None
    return spec, resources, profile


def _validated(stage: str, spec: dict[str, Any] | StageSpec,
               profile: Profile) -> tuple[StageSpec, dict[str, Any]]:
    """The spec as the stage's model, and the profile's layout defaults it took."""
    model = get_stage(stage).spec
    if isinstance(spec, StageSpec) and not isinstance(spec, model):
        raise SpecError(f"stage {stage} takes a {model.__name__}, not a {type(spec).__name__}")
    given = spec.model_dump(exclude_unset=True) if isinstance(spec, StageSpec) else spec
    defaults = profile.layout.for_spec(model, given)
    if isinstance(spec, model) and not defaults:
        return spec, defaults
    try:
        return model.model_validate({**given, **defaults}), defaults
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, f"<{stage} spec>")
                        + _from_profile(profile, defaults)) from None


def _from_profile(profile: Profile, defaults: dict[str, Any]) -> str:
    if not defaults:
        return ""
    taken = ", ".join(f"{k} {v}" for k, v in defaults.items())
    where = profile.where("layout", next(iter(defaults)))
    return f" (with {taken} from the profile's layout, {where})"


def _inline(stage: str, spec: StageSpec, run: RunDir, profile: Profile,
            checkpoint_dir: str | None, artifact: str | None) -> Job:
    """Run now, in this process; the Job holds the outcome (result() raises a failure)."""
    try:
        outcome = ("COMPLETED", run_inline(stage, spec, run, profile.environment(),
                                           checkpoint_dir, artifact), None)
    except Preempted as exc:
        outcome = ("PREEMPTED", None, exc)
    except Exception as exc:  # noqa: BLE001 - handed to the caller through Job.result()
        outcome = ("FAILED", None, exc)
    return Job(run, stage, "inline", inline=outcome)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
