"""Where lmforge keeps things on the shared filesystem: one root, `LMFORGE_HOME` (default
`./lmforge-home`), so that every node and every flow finds the same artifacts, jobs and tracking
store."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "LMFORGE_HOME"


def lmforge_home() -> Path:
    return Path(os.environ.get(HOME_ENV) or "lmforge-home").expanduser().absolute()


def artifact_folder(stage: str, fingerprint: str) -> Path:
    """`<home>/artifacts/<stage>/<fingerprint[:16]>`: the same inputs and settings always land in
    the same folder, which is what makes a finished stage findable again (the cache)."""
    return lmforge_home() / "artifacts" / stage / fingerprint[:16]
