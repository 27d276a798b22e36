"""How a profile's container image wraps a job (docs/container.md).

- pyxis (Slurm's enroot plugin): every task of the job step runs in the image, submitit's
  launcher and the engine alike: `srun --container-image=... --container-mounts=...`.
- apptainer, podman: the launcher runs on the node's own Python (it handles Slurm's signals and
  requeues with the node's `scontrol`), and each rank's engine runs in the image through the
  image's entrypoint, `python3 -m engine`: `apptainer run IMAGE STAGE ...` or
  `podman run ... IMAGE STAGE ...`.

The engine's environment crosses into the container by name, never as values on a command line
(they may hold credentials), without the host's own paths (PATH, PYTHONPATH, a virtual
environment), which would point the image's Python at the host's files.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Runtime = Literal["pyxis", "apptainer", "podman"]
# the host's own paths and shell state: meaningless or harmful inside the image
HOST_ONLY = {"PATH", "HOME", "PWD", "OLDPWD", "SHELL", "SHLVL", "_", "PYTHONPATH", "PYTHONHOME",
             "PYTHONSTARTUP", "PYTHONEXECUTABLE", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "LD_PRELOAD",
             "TMPDIR"}
_HOST_PREFIXES = ("CONDA_", "XDG_", "BASH_FUNC_", "APPTAINER", "SINGULARITY")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Container(BaseModel):
    """The image the profile's stages run in."""
    model_config = ConfigDict(extra="forbid")

    runtime: Runtime = Field("pyxis", description="pyxis: srun runs every task in the image "
                             "(Slurm only); apptainer, podman: each rank's engine runs in it")
    image: str = Field(description="pyxis: REGISTRY#IMAGE:TAG or a .sqsh file; apptainer: a .sif "
                       "file or docker://...; podman: an image in the node's store")
    mounts: list[str] = Field(default_factory=list, description="SRC:DST[:FLAGS]; the job's run "
                              "folder and every path the stage reads or writes must be inside")
    workdir: str | None = None
    options: list[str] = Field(default_factory=list, description="more options of the runtime's "
                               "run command (apptainer, podman), e.g. podman's --ulimit")

    def shows(self, path: Path) -> bool:
        """Whether `path` is mounted in the container at the same path (the job's run folder
        must be: the spec and the launcher's files are named by their host paths)."""
        for mount in self.mounts:
            src, _, rest = mount.partition(":")
            dst = rest.split(":")[0] or src
            if src == dst and path.resolve().is_relative_to(Path(src).resolve()):
                return True
        return False

    def srun_args(self) -> list[str]:
        """pyxis's srun options; none for the other runtimes."""
        if self.runtime != "pyxis":
            return []
        args = [f"--container-image={self.image}"]
        if self.mounts:
            args.append("--container-mounts=" + ",".join(self.mounts))
        if self.workdir:
            args.append(f"--container-workdir={self.workdir}")
        return args

    def engine_command(self, env: dict[str, str], gpus: bool,
                       name: str) -> tuple[list[str], dict[str, str]]:
        """The command that starts the engine in the image (the stage's arguments follow it) and
        the environment to start it with; `name` names the podman container (one per rank and
        attempt), so that it can be killed by name."""
        passed = [k for k in env if _NAME.fullmatch(k) and k not in HOST_ONLY
                  and not k.startswith(_HOST_PREFIXES)]
        if self.runtime == "apptainer":
            # --cleanenv: only APPTAINERENV_* variables reach the container, without the prefix
            command = ["apptainer", "run", "--cleanenv", *(["--nv"] if gpus else []),
                       *_flags("--bind", self.mounts), *_flags("--pwd", [self.workdir]),
                       *self.options, self.image]
            return command, {**env, **{f"APPTAINERENV_{k}": env[k] for k in passed}}
        if self.runtime == "podman":
            command = ["podman", "run", "--rm", "--name", name, "--network=host", "--ipc=host",
                       *(["--device=nvidia.com/gpu=all"] if gpus else []),
                       *_flags("--volume", self.mounts), *_flags("--workdir", [self.workdir]),
                       *_flags("--env", passed), *self.options, self.image]
            return command, env
        raise ValueError(f"runtime {self.runtime}: the engine is not started by the launcher")

    def kill(self, name: str) -> None:
        """Stop the rank's container outright (podman's keeps running when its client is
        killed; apptainer's processes are the client's own children)."""
        if self.runtime == "podman":
            subprocess.run(["podman", "rm", "--force", "--time=0", name],
                           capture_output=True, timeout=60)


def _flags(flag: str, values: list[str | None]) -> list[str]:
    return [part for v in values if v for part in (flag, v)]
