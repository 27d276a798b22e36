"""Checks of a submission against its profile and, when reachable, the live cluster, before
anything is queued: a typo in a partition name should fail in a second at submit time, not after
hours in the queue."""

from __future__ import annotations

import shutil
import subprocess

from cluster.profiles import Profile, ProfileError
from cluster.resources import Resources


def check(profile: Profile, resources: Resources) -> None:
    if profile.executor == "inline":
        if resources.world_size != 1:
            raise ProfileError(f"{profile.where('executor')}: executor inline runs one rank in "
                               f"this process, not {resources.world_size}")
        return
    if resources.time_min * 60 <= profile.requeue.signal_delay_s:
        raise ProfileError(f"{profile.where('requeue', 'signal_delay_s')}: requeue.signal_delay_s "
                           f"({profile.requeue.signal_delay_s} s) must be shorter than the time "
                           f"limit ({resources.time_min} min)")
    if profile.executor == "local":
        if resources.nodes != 1:
            raise ProfileError(f"{profile.where('executor')}: executor local runs on this machine "
                               f"only: nodes must be 1, not {resources.nodes}")
        return
    _check_slurm(profile, resources)


def partitions(timeout_s: float = 20) -> dict[str, tuple[int, bool]]:
    """Partition name -> (node count, is the default), from sinfo."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        raise ProfileError("executor slurm needs Slurm's client commands (sinfo, sbatch, sacct) on "
                           "PATH, and SLURM_CONF where the cluster's slurm.conf is not the default")
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P|%D"], capture_output=True, text=True,
                             timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ProfileError(f"sinfo did not answer within {timeout_s:.0f} s: is slurmctld "
                           "up?") from None
    if out.returncode != 0:
        raise ProfileError(f"sinfo failed (status {out.returncode}): {out.stderr.strip()}")
    found: dict[str, tuple[int, bool]] = {}
    for line in out.stdout.splitlines():  # one line per (partition, node state) group
        name, count = line.strip().split("|")
        default = name.endswith("*")
        name = name.rstrip("*")
        nodes, was_default = found.get(name, (0, False))
        found[name] = (nodes + int(count), default or was_default)
    return found


def _check_slurm(profile: Profile, resources: Resources) -> None:
    known = partitions()
    wanted = profile.slurm_settings.partition
    if wanted is None:
        wanted = next((name for name, (_, default) in known.items() if default), None)
        if wanted is None:
            raise ProfileError(f"{profile.where('slurm')}: the cluster has no default partition; "
                               f"set slurm.partition to one of {', '.join(sorted(known))}")
    elif wanted not in known:
        raise ProfileError(f"{profile.where('slurm', 'partition')}: slurm.partition: unknown "
                           f"partition {wanted!r}; sinfo lists {', '.join(sorted(known)) or 'none'}")
    if resources.nodes > known[wanted][0]:
        raise ProfileError(f"{resources.nodes} nodes asked for, but partition {wanted!r} has "
                           f"{known[wanted][0]}")
