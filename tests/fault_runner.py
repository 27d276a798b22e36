"""Run an engine stage in this process with one fault injected at a named point, for the
fault-injection tests: `python tests/fault_runner.py FAULT -- STAGE ARGS...`.

FAULT is `ACTION@MODULE:ATTR[#N][+]`: when the function MODULE.ATTR is called for the N-th time
(default 1), before the call (or after it, with `+`), do ACTION:
  kill   SIGKILL this process (a node lost, the OOM killer): nothing runs after it;
  term   send SIGTERM to this process (preemption, scancel) and carry on;
  nan    (with `+`) make the function's result NaN from that call on (a diverging loss);
  nan1   (with `+`) make that one call's result NaN (one bad batch).
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys


def _inject(fault: str) -> None:
    action, _, where = fault.partition("@")
    target, _, count = where.partition("#")
    after = count.endswith("+") or target.endswith("+")
    target, count = target.rstrip("+"), int(count.rstrip("+") or 1)
    module_name, _, attr = target.partition(":")
    owner = importlib.import_module(module_name)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    calls = 0

    def act() -> None:
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "term":
            os.kill(os.getpid(), signal.SIGTERM)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == count and not after:
            act()
        result = original(*args, **kwargs)
        if (action == "nan" and calls >= count) or (action == "nan1" and calls == count):
            return result * float("nan")
        if calls == count and after:
            act()
        return result

    setattr(owner, name, wrapper)


if __name__ == "__main__":
    split = sys.argv.index("--")
    for fault in sys.argv[1:split]:
        _inject(fault)
    from engine.__main__ import main

    sys.exit(main(sys.argv[split + 1:]))
