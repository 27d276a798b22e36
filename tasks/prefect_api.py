"""Which Prefect server a flow started from the command line reports to (`python -m
flows.lifecycle`, `make demo`), so that one UI shows the demo's runs beside the deployments':

1. PREFECT_API_URL, when set (environment or Prefect profile);
2. else the server `scripts/server.sh prefect start` runs with its state in
   `$LMFORGE_HOME/servers/prefect` — the one the deployments and their worker use —, when it answers;
3. else Prefect's temporary server, as for any Prefect script (its database in PREFECT_HOME).

With a server, Prefect's UI URL follows from its API URL, so each MLflow parent run links its
flow run (tag `prefect.flow_run_url`); a temporary server has no UI to link.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx
from prefect.settings import (PREFECT_API_URL, PREFECT_HOME,
                              PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings)

from tasks.home import lmforge_home

# A first start of the temporary server creates its database: on a busy 2-core machine that can
# take longer than Prefect's 20 s default.
TEMPORARY_SERVER_START_S = 120


def server_state() -> Path:
    """scripts/server.sh's default state folder for the Prefect server."""
    return lmforge_home() / "servers" / "prefect"


def running_server() -> str | None:
    """The API URL that scripts/server.sh recorded in its state folder (server.url), if the
    server there answers."""
    try:
        url = (server_state() / "server.url").read_text().strip()
        httpx.get(f"{url}/health", timeout=5).raise_for_status()
    except (OSError, httpx.HTTPError):
        return None
    return url


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """The block's flow runs report to the server chosen as above; yields a line saying which."""
    if PREFECT_API_URL.value():
        yield f"the server at {PREFECT_API_URL.value()} (PREFECT_API_URL)"
        return
    url = running_server()
    if url:
        with temporary_settings({PREFECT_API_URL: url}):
            yield f"the server at {url} (scripts/server.sh, state in {server_state()})"
        return
    wait = max(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value(), TEMPORARY_SERVER_START_S)
    with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: wait}):
        yield (f"a temporary server, database in {PREFECT_HOME.value()} (for one server with the "
               f"deployments: scripts/server.sh prefect start)")
