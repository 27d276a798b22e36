"""Where lmforge keeps things on the shared filesystem: one root, `LMFORGE_HOME` (default
`./lmforge-home`), so that every node and every flow finds the same artifacts, jobs and tracking
store. What lmforge writes — stage outputs, MLflow artifact locations, registered models — must
lie inside it (`inside_home`); inputs may come from anywhere (a shared dataset)."""

from __future__ import annotations

import os
from pathlib import Path

from engine.errors import SpecError

HOME_ENV = "LMFORGE_HOME"


def lmforge_home() -> Path:
    return Path(os.environ.get(HOME_ENV) or "lmforge-home").expanduser().absolute()


def artifact_folder(stage: str, fingerprint: str) -> Path:
    """`<home>/artifacts/<stage>/<fingerprint[:16]>`: the same inputs and settings always land in
    the same folder, which is what makes a finished stage findable again (the cache)."""
    return lmforge_home() / "artifacts" / stage / fingerprint[:16]


def inside_home(path: str | Path, field: str) -> Path:
    """`path` resolved (symlinks and `..` followed, relative to the working directory), refused
    with SpecError unless it lies strictly inside LMFORGE_HOME: a write location outside could
    overwrite anything this user may write, and a forced re-run deletes its location first (so
    not the home itself either)."""
    home = lmforge_home().resolve()
    resolved = Path(path).expanduser().resolve()
    if resolved != home and resolved.is_relative_to(home):
        return resolved
    plain = Path(path).expanduser().absolute() == resolved
    shown = str(path) if plain else f"{path} (resolves to {resolved})"
    where = "is LMFORGE_HOME itself" if resolved == home else "is outside LMFORGE_HOME"
    raise SpecError(f"{field}: {shown} {where} ({home}); lmforge writes only inside it: "
                    f"choose a location under it, or set {HOME_ENV} to a folder that holds "
                    f"this one")
