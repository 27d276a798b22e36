"""submitit executors built from a profile and resources: Slurm (sbatch + srun, one task per
rank, `tasks_per_node = gpus_per_node`) and local (one process per rank on this machine). Both
run the same RankLauncher, so a stage behaves the same on a laptop and on 64 nodes."""

from __future__ import annotations

import math
from typing import Any

import submitit

from cluster.layout import RunDir
from cluster.profiles import Profile
from cluster.resources import Resources


def make_executor(profile: Profile, resources: Resources, run: RunDir,
                  job_name: str) -> submitit.Executor:
    kind = {"slurm": submitit.SlurmExecutor, "local": submitit.LocalExecutor}[profile.executor]
    executor = kind(folder=run.submitit, max_num_timeout=profile.requeue.max_num_timeout,
                    python=profile.python)
    if profile.executor == "slurm":
        executor.update_parameters(**slurm_parameters(profile, resources, job_name))
    else:
        executor.update_parameters(tasks_per_node=resources.ranks_per_node,
                                   gpus_per_node=resources.gpus_per_node,
                                   timeout_min=resources.time_min,
                                   signal_delay_s=profile.requeue.signal_delay_s,
                                   setup=profile.setup)
    return executor


def slurm_parameters(profile: Profile, resources: Resources, job_name: str) -> dict[str, Any]:
    """SlurmExecutor parameters. Always: `--requeue` (Slurm requeues the job after a node
    failure) and `srun --kill-on-bad-exit=1` (a rank that dies takes the step down instead of
    leaving its peers blocked in a collective)."""
    s = profile.slurm_settings
    params = {
        "job_name": job_name, "partition": s.partition, "account": s.account, "qos": s.qos,
        "constraint": s.constraint, "exclusive": True if s.exclusive else None,
        "nodes": resources.nodes, "ntasks_per_node": resources.ranks_per_node,
        "cpus_per_task": resources.cpus_per_task, "gpus_per_node": resources.gpus_per_node or None,
        "mem": f"{math.ceil(resources.mem_gb * 1024)}M" if resources.mem_gb else None,
        "time": resources.time_min, "signal_delay_s": profile.requeue.signal_delay_s,
        "setup": profile.setup or None,
        "srun_args": ["--kill-on-bad-exit=1",
                      *(profile.container.srun_args() if profile.container else []),
                      *s.srun_args],
        "additional_parameters": {"requeue": True, **s.sbatch},
    }
    return {k: v for k, v in params.items() if v is not None}
