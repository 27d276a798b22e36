"""Signals that ask a stage to stop (Ctrl-C, SIGTERM, Slurm's SIGUSR2 warning) are remembered,
not acted on at once: the stage checks between units of work and stops where it can stop
cleanly — after a training step with a checkpoint, or between tokenize batches with the process
pool in a known state (an exception raised inside the pool's locking could hang its shutdown)."""

from __future__ import annotations

import logging
import signal
import threading

from engine.errors import Preempted

log = logging.getLogger(__name__)


class StopSignals:
    def __init__(self, *signals: signal.Signals, note: str | None = None) -> None:
        self.signals = signals
        self.note = note
        self.received: int | None = None
        self._old: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # handlers live there only
            for sig in self.signals:
                self._old[sig] = signal.signal(sig, self._remember)
        return self

    def _remember(self, signum, frame) -> None:
        self.received = signum
        if self.note:
            log.warning("received %s: %s", signal.Signals(signum).name, self.note)

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received).name if self.received is not None else None

    def as_exception(self) -> BaseException:
        """What the stage raises to stop: Ctrl-C is an interrupt (exit 130), the others ask for
        a run to be tried again (exit 75)."""
        if self.received == signal.SIGINT:
            return KeyboardInterrupt(self.name)
        return Preempted(f"{self.name} received; no output was left under its final name")

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
