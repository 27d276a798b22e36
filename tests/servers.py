"""Real servers for tests, started and stopped by the project's own script (scripts/server.sh) on
127.0.0.1, and the command-line clients that talk to them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conftest import REPO

SERVER = REPO / "scripts" / "server.sh"
PREFECT = str(Path(sys.executable).parent / "prefect")  # the CLI of this environment


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server(kind: str, action: str, state: Path, port: int | None = None) -> str:
    """`server.sh KIND ACTION STATE [PORT]`; the URL for "start"."""
    args = ["bash", str(SERVER), kind, action, str(state)] + ([str(port)] if port else [])
    out = subprocess.run(args, capture_output=True, text=True, timeout=200)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1].split("=", 1)[1] if action == "start" else ""


@contextmanager
def serving(kind: str, state: Path) -> Iterator[str]:
    """A server on a free port for the block; stopped by its recorded PID afterwards."""
    url = server(kind, "start", state, free_port())
    try:
        yield url
    finally:
        server(kind, "stop", state)
        assert not (state / "server.pid").exists()


def drain_prefect_clients() -> None:
    """Send what this process's flows queued for the Prefect API (logs, events) while the server
    is up: Prefect's exit handler waits on anything left for a server that is gone, forever."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=60)
    EventsWorker.drain_all(timeout=60)


def cli(*args: str, env: dict, timeout: int = 120) -> str:
    out = subprocess.run(list(args), cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"{' '.join(args)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def until(what: str, condition, timeout_s: float, every_s: float = 0.2):
    """Poll `condition()` until it returns something true; TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout_s:.0f} s")
        time.sleep(every_s)
    return value


def kill_worker(worker: subprocess.Popen) -> None:
    """SIGKILL the worker's process group and that of its flow run (Prefect starts each flow run
    in a session of its own): what the loss of the worker's machine does."""
    children = [int(p) for p in os.listdir("/proc") if p.isdigit() and running(int(p))
                and parent_pid(int(p)) == worker.pid]
    groups = {worker.pid} | {os.getpgid(pid) for pid in children}
    for group in groups:
        os.killpg(group, signal.SIGKILL)
    worker.wait(timeout=30)


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
