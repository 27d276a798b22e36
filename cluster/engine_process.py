"""One rank's engine as a child process: `python -m engine STAGE --config SPEC`, or the same
through a container runtime (cluster/container.py).

A child rather than an in-process call, so that the job's Python (submitit's) stays responsive to
signals and survives the engine crashing, and so that the engine runs exactly as on a laptop.
Its stderr (the engine's log) goes, line by line, to the rank's log file (which the caller
streams) and to this process's stderr (submitit's per-task logs); its stdout, where the engine
prints only its manifest, is kept for the caller and echoed to this process's stdout. What goes
to a log has URL passwords masked (engine/redact.py); the manifest kept for the caller does not.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Callable

from engine.redact import redact_text

_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """Runs in the child before exec: if the job's process is killed outright (SIGKILL at the
    end of a grace period), the engine goes with it instead of living on as an orphan."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class EngineProcess:
    def __init__(self, command: list[str], env: dict[str, str], log_path: str | Path,
                 header: str, on_kill: Callable[[], None] = lambda: None) -> None:
        """`command`: the engine's argv; `on_kill` also runs when it is killed (a container
        runtime's process may outlive its client)."""
        self.returncode: int | None = None
        self._on_kill = on_kill
        self._stdout: list[str] = []
        self._lock = threading.Lock()
        self._log = open(log_path, "a", encoding="utf-8", buffering=1)
        self._write(header + "\n", sys.stderr)
        self._proc = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, errors="replace",
            preexec_fn=_die_with_parent if _prctl else None)
        self._pumps = [
            threading.Thread(target=self._pump, args=(self._proc.stdout, sys.stdout, True), daemon=True),
            threading.Thread(target=self._pump, args=(self._proc.stderr, sys.stderr, False), daemon=True)]
        for pump in self._pumps:
            pump.start()
        # only this thread reaps the child: signal handlers never block on Popen's wait lock
        threading.Thread(target=self._reap, daemon=True).start()

    def _write(self, line: str, echo: IO[str]) -> None:
        line = redact_text(line)
        with self._lock:
            if not self._log.closed:  # a pump outliving the reaper's join writes nowhere
                self._log.write(line)
            echo.write(line)
            echo.flush()

    def _pump(self, stream: IO[str], echo: IO[str], keep: bool) -> None:
        """stderr (the engine's log) goes to the rank log; stdout carries only the manifest JSON,
        kept for the caller rather than streamed."""
        for line in stream:
            if keep:
                self._stdout.append(line)
                echo.write(redact_text(line))
                echo.flush()
            else:
                self._write(line, echo)

    def _reap(self) -> None:
        code = self._proc.wait()
        for pump in self._pumps:
            pump.join(timeout=10)  # a grandchild holding the pipes must not hold us
        with self._lock:
            self._log.close()
        self.returncode = code

    @property
    def stdout(self) -> str:
        return "".join(self._stdout)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            self._proc.send_signal(sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
        self._on_kill()

    def wait(self, timeout_s: float | None = None, give_up: Callable[[], bool] = lambda: False,
             give_up_every_s: float = 2.0) -> int | None:
        """The exit status, or None after `timeout_s` or once `give_up()` is true (asked every
        `give_up_every_s`: it may stat a shared filesystem). Short sleeps keep the signal
        handlers of this (main) thread prompt."""
        now = time.monotonic()
        deadline = None if timeout_s is None else now + timeout_s
        next_ask = now
        while self.returncode is None:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return None
            if now >= next_ask:
                if give_up():
                    return None
                next_ask = now + give_up_every_s
            time.sleep(0.1)
        return self.returncode
