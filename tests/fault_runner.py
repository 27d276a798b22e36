"""A fork server for the tests' engine processes: `python -m tests.fault_runner SOCKET` imports
torch and every stage and command once, then, for each connection on the Unix socket SOCKET, forks a
process that runs `python -m engine ARGV` as a fresh interpreter would, with faults injected at
named points. A test pays a fork (milliseconds) instead of an interpreter start and torch's import
(seconds); tests/conftest.py's `forked_engine` is the client.

A connection sends two file descriptors (the stage's stdout and stderr) with one byte, then the
request as JSON, {"argv", "env", "cwd", "faults"}, and closes its writing side. The server forks a
waiter for it, which forks the stage's process, answers that process's pid, a line, and, when it
ends, its exit status as subprocess writes it (negative: the signal that killed it), a line. The
test signals the stage's process itself, by pid: a SIGKILL kills the very process doing the work.

A fault is `ACTION@MODULE:ATTR[#N][+]`: when the function MODULE.ATTR is called for the N-th time
(default 1), before the call (or after it, with `+`), do ACTION:
  kill   SIGKILL this process (a node lost, the OOM killer): nothing runs after it;
  term   send SIGTERM to this process (preemption, scancel) and carry on;
  nan    (with `+`) make the function's result NaN from that call on (a diverging loss);
  nan1   (with `+`) make that one call's result NaN (one bad batch).

Fork safety: the server forks only while it has a single thread (checked). Importing torch starts
no thread with OMP_NUM_THREADS=1 (the client sets it: every engine process of the tests runs so),
and the server runs no torch operation, so no lock of a thread pool is copied held.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import json
import os
import select
import signal
import socket
import sys
import traceback


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
    # Every engine module was imported before the injection (the server's preload), so one that
    # did `from MODULE import ATTR` holds the original: rebind it, as an import after the
    # injection would have bound the wrapper.
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("engine") and \
                getattr(module, name, None) is original:
            setattr(module, name, wrapper)


def _preload() -> None:
    """What every engine process imports, imported once: torch and each command's module."""
    from engine.registry import COMMANDS, STAGES

    importlib.import_module("engine.__main__")
    for command in [*STAGES.values(), *COMMANDS.values()]:
        command.run  # the property imports the module
    threads = len(os.listdir("/proc/self/task"))
    assert threads == 1, f"the fork server has {threads} threads after its imports: unsafe to fork"


def _run_stage(request: dict, out: int, err: int) -> None:
    """In the forked process: become `python -m engine ARGV` (stdio, cwd, environment, default
    signal handling), inject the faults, run the stage and exit with its status."""
    code = 1
    try:
        for target, fd in ((0, os.open(os.devnull, os.O_RDONLY)), (1, out), (2, err)):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["-m", *request["argv"]]
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fault in request["faults"]:
            _inject(fault)
        from engine.__main__ import main

        code = main(request["argv"])
    except SystemExit as exc:  # the status the interpreter would make of it
        code = exc.code or 0
        if not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
    finally:  # never back into the caller's code: this process is a fork of the waiter
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait_for_stage(conn: socket.socket) -> None:
    """In the waiter: read the request, fork the stage's process, report its pid and status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    _, fds, _, _ = socket.recv_fds(conn, 1, 2)
    request = json.loads(conn.makefile("rb").read())
    pid = os.fork()
    if pid == 0:
        conn.close()
        _run_stage(request, *fds)
    for fd in fds:
        os.close(fd)
    conn.sendall(f"{pid}\n".encode())
    _, status = os.waitpid(pid, 0)
    conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())


def serve(path: str) -> None:
    """Fork a waiter per connection until stdin closes (the test session ended or died)."""
    _preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # waiters are reaped by the kernel
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([listener, sys.stdin], [], [])
        if sys.stdin in ready:
            return
        conn, _ = listener.accept()
        if os.fork() == 0:
            try:
                listener.close()
                _wait_for_stage(conn)
            except BaseException:
                traceback.print_exc()
            finally:  # never back into the loop: this process is a forked waiter
                os._exit(0)
        conn.close()


if __name__ == "__main__":
    serve(sys.argv[1])
