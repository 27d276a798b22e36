"""Shared test fixtures: paths to the real test material in ../shared/data (never used by the
project at run time) and small helpers."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TESTCLUSTER = REPO / "cluster" / "testcluster"
START_TIMEOUT_S = 900  # a cold start installs packages (~20 s on a CI-class machine)


def shared(*parts: str) -> Path:
    """A path in ../shared/data; the test skips if it is missing (fails under CI: see
    pytest_runtest_makereport)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"test material {path} is not present")
    return path


TINY_MODEL = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2,
              "num_heads": 4, "num_kv_heads": 2, "max_position_embeddings": 128}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> str:
    """A 600-story generated corpus, a tokenizer trained on it, the tokenized dataset's prefix."""
    from engine.data import synthetic, tokenize, train_tokenizer

    root = tmp_path_factory.mktemp("tiny-data")
    synthetic.run(synthetic.Spec(output=str(root / "corpus"), documents=600, shards=1))
    train_tokenizer.run(train_tokenizer.Spec(input=[str(root / "corpus")], output=str(root / "tok"),
                                             vocab_size=512))
    tokenize.run(tokenize.Spec(input=[str(root / "corpus")], output_prefix=str(root / "stories"),
                               tokenizer=str(root / "tok" / "tokenizer.model"), append_eod=True,
                               progress=False))
    return str(root / "stories_text_document")


@pytest.fixture(scope="session")
def fixtures(tiny_dataset, tmp_path_factory) -> dict:
    """The generated corpus, its tokenizer and dataset; a 2-iteration pretrain checkpoint on it
    and its HF export (checked by our own loader: transformers would only cost start-up time)."""
    from engine.convert import stage as convert
    from engine.train.loop import train
    from engine.train.spec import PretrainSpec

    data = Path(tiny_dataset).parent
    root = tmp_path_factory.mktemp("bad-input-fixtures")
    train(PretrainSpec.model_validate({
        "model": TINY_MODEL, "data": {"blend": [tiny_dataset], "seq_length": 32},
        "checkpoint": {"save": str(root / "checkpoint")}, "iters": 2, "global_batch_size": 2,
        "precision": "fp32", "device": "cpu"}), "pretrain")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "transformers", None)
        convert.run(convert.Spec(load_dir=str(root / "checkpoint"), save_dir=str(root / "hf"),
                                 source_format="native", target_format="hf"))
    return {"corpus": data / "corpus", "tokenizer": data / "tok" / "tokenizer.model",
            "dataset": tiny_dataset, "checkpoint": root / "checkpoint", "hf_model": root / "hf"}


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


class Forked:
    """A stage's process forked by the fork server (tests/fault_runner.py), used as a
    subprocess.Popen: pid, returncode, send_signal, poll, wait, communicate."""

    def __init__(self, conn: socket.socket, out, err):
        self._conn, self._buffer, self._out, self._err = conn, b"", out, err
        self.pid = self._next_line()
        self.returncode = None

    def _next_line(self) -> int:
        while b"\n" not in self._buffer:
            chunk = self._conn.recv(64)
            assert chunk, "the fork server's waiter died"
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return int(line)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def poll(self) -> int | None:
        try:
            return self.wait(timeout=0)
        except subprocess.TimeoutExpired:
            return None

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if b"\n" not in self._buffer and not select.select([self._conn], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(f"engine {self.pid}", timeout)
            self.returncode = self._next_line()
            self._conn.close()
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return self.output()

    def output(self) -> tuple[str, str]:
        """Its stdout and stderr so far (pread: the process shares the files' offsets)."""
        return tuple(os.pread(f.fileno(), os.fstat(f.fileno()).st_size, 0).decode(errors="replace")
                     for f in (self._out, self._err))


_fork_server: tuple[subprocess.Popen, str] | None = None


def _started_fork_server() -> str:
    """The fork server's socket, the server started on first use (one per test session: it
    costs an interpreter start and the imports, ~10 s); pytest_sessionfinish stops it."""
    global _fork_server
    if _fork_server is None:
        path = os.path.join(tempfile.mkdtemp(prefix="lmforge-forks-"), "socket")
        proc = subprocess.Popen([sys.executable, "-m", "tests.fault_runner", path], cwd=REPO,
                                env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "ready\n", "the fork server did not start"
        _fork_server = proc, path
    return _fork_server[1]


def pytest_sessionfinish(session) -> None:
    if _fork_server is not None:
        proc, path = _fork_server
        proc.stdin.close()  # its signal to stop
        proc.wait(timeout=60)
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def forked_engine(argv: list[str], faults: tuple[str, ...] = (),
                  env: dict[str, str] | None = None) -> Forked:
    """`python -m engine ARGV` with `faults` injected (tests/fault_runner.py), in this process's
    environment updated by `env` with OMP_NUM_THREADS=1, as a process forked from the fork
    server: what a fresh interpreter would do, without its start and torch's import."""
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(_started_fork_server())
    socket.send_fds(conn, [b"\0"], [out.fileno(), err.fileno()])
    request = {"argv": [str(a) for a in argv], "cwd": str(REPO), "faults": list(faults),
               "env": {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}}
    conn.sendall(json.dumps(request).encode())
    conn.shutdown(socket.SHUT_WR)
    return Forked(conn, out, err)


def engine_ranks(*commands: list[str], ranks: int) -> list[str]:
    """`python -m engine ARGS` for each ARGS of `commands`, one after the other, each as
    `ranks` processes of one job (gloo), as a job's steps would; forked (forked_engine), so
    that none pays for an interpreter start and torch's import. Their stderr, per rank. Each
    command gets a master port of its own: torch's store does not serve a second process group
    on the port of the first."""
    logs = [""] * ranks
    for argv in commands:
        env = {"WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": _free_port()}
        procs = [forked_engine(argv, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
                 for r in range(ranks)]
        results = [p.communicate(timeout=300) for p in procs]
        assert all(p.returncode == 0 for p in procs), "\n".join(err[-3000:] for _, err in results)
        logs = [log + err for log, (_, err) in zip(logs, results)]
    return logs


def module_ranks(module: str, args: list[str], ranks: int) -> list:
    """`python -m MODULE ARGS` as `ranks` processes of one job (gloo, one thread each); the last
    line each printed, read as JSON."""
    env = {**os.environ, "WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": _free_port(), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(ranks)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(err[-3000:] for _, err in outs)
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def logged_losses(save: Path) -> dict[int, float]:
    """Step -> training loss from a run's metrics.jsonl; a step logged again after a resume keeps
    its last value."""
    out = {}
    for line in (save / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "metrics" and "loss" in rec["data"]:
            out[rec["step"]] = rec["data"]["loss"]
    return out


def random_hf_model(cfg, seed: int = 0):
    """A transformers model built from our exported config.json, with weights large enough that
    attention is far from uniform (HF's own init, std 0.02, would make every model look alike)."""
    import torch
    import transformers

    hf_cfg = dict(cfg.to_hf())
    hf_config = transformers.AutoConfig.for_model(hf_cfg.pop("model_type"), **hf_cfg)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.1 * noise if "norm" in name else 0.1 * noise)
    return model


@pytest.fixture
def llama2_sp() -> Path:
    return shared("tokenizers", "llama2", "tokenizer.model")


@pytest.fixture
def write_jsonl(tmp_path):
    def write(name: str, rows: list, raw_lines: list[bytes] | None = None) -> Path:
        path = tmp_path / name
        with open(path, "wb") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False).encode() + b"\n")
            for line in raw_lines or []:
                f.write(line + b"\n")
        return path
    return write


@pytest.fixture(scope="module")
def prefect_server_home(tmp_path_factory) -> Path:
    """An LMFORGE_HOME whose servers/prefect holds the module's Prefect server (below): where
    scripts/server.sh keeps it by default, so the demo finds it there (tasks/prefect_api.py)."""
    return tmp_path_factory.mktemp("prefect-home")


@pytest.fixture(scope="module")
def prefect_server(prefect_server_home):
    """A real Prefect server for the module's tests; what this process's flows sent it is
    delivered before it stops."""
    from servers import drain_prefect_clients, serving

    with serving("prefect", prefect_server_home / "servers" / "prefect") as url:
        try:
            yield url
        finally:
            drain_prefect_clients()


@pytest.fixture
def home(tmp_path, monkeypatch, prefect_server):
    """LMFORGE_HOME in a temporary folder; flows of this process report to the real server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LMFORGE_CLUSTER_PROFILE", raising=False)
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        yield tmp_path / "home"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI a test skipped for want of ../shared/data fails: CI must not pass by testing
    less. Such a skip is one whose reason names that folder — shared()'s, or a test's own."""
    report = yield
    if report.skipped and not hasattr(report, "wasxfail") and _in_ci():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if str(SHARED_DATA) in reason:
            report.outcome = "failed"
            report.longrepr = f"test material missing, and CI is set: {reason}"
    return report


def _unavailable(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"Slurm test cluster unavailable, and CI is set: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start (or reuse) the real Slurm test cluster (cluster/testcluster/start.sh); yield
    {"SLURM_CONF": ..., "run_dir": ...}. Without root or apt the tests skip, except under CI,
    where that is a failure. Test sessions on one host share the cluster: the last one out stops
    it, if a test session started it (one started by hand stays up)."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        _unavailable("the Slurm test cluster needs root on Linux (it installs and starts daemons)")
    run_dir = Path(os.environ.get("LMFORGE_TESTCLUSTER_DIR", "/tmp/lmforge-testcluster"))
    with _cluster_lock(run_dir):
        env, started = _start_cluster()
        if started:  # sessions recorded before the cluster's last stop are gone
            shutil.rmtree(_sessions(run_dir), ignore_errors=True)
        _sessions(run_dir).mkdir(exist_ok=True)
        if started:
            (_sessions(run_dir) / "started-by-tests").touch()
        (_sessions(run_dir) / str(os.getpid())).touch()
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = env["SLURM_CONF"]  # sbatch, sacct, scancel (and jobs) read it
    try:
        yield {"SLURM_CONF": env["SLURM_CONF"], "run_dir": Path(env["SLURM_CONF"]).parents[1]}
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        with _cluster_lock(run_dir):
            (_sessions(run_dir) / str(os.getpid())).unlink(missing_ok=True)
            others = [p for p in _sessions(run_dir).iterdir() if p.name.isdigit()
                      and Path(f"/proc/{p.name}").exists()]
            if not others and (_sessions(run_dir) / "started-by-tests").exists():
                subprocess.run(["bash", str(TESTCLUSTER / "stop.sh")], capture_output=True,
                               timeout=120)
                shutil.rmtree(_sessions(run_dir))


@pytest.fixture(scope="session")
def node_image() -> dict:
    """The node image built from this checkout on the Debian base, for real
    (docker/cpu-image.sh: ~1 min once the base exists, ~2.5 min before): its tag, size, and the
    podman options that run it here. Without root the tests skip, except under CI."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        _unavailable("building the image needs root on Linux (debootstrap, buildah)")
    tag = "localhost/lmforge:test"
    proc = subprocess.run(["bash", str(REPO / "docker" / "cpu-image.sh"), tag],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode == 3:
        _unavailable(f"cpu-image.sh could not install its tools with apt:\n{proc.stderr[-3000:]}")
    assert proc.returncode == 0, f"cpu-image.sh failed:\n{proc.stderr[-6000:]}"
    _, megabytes, _ = proc.stdout.split()
    return {"tag": tag, "megabytes": int(megabytes), "podman_options": podman_options(tag)}


def podman_options(tag: str) -> list[str]:
    """The `podman run` options that start `tag` here. podman (as root) asks the OCI runtime for
    1,048,576 open files and processes, and caps its own processes at 32,768: where the caller
    lacks CAP_SYS_RESOURCE (this sandbox) the runtime may not raise to that, so ask for what the
    caller has. Its default runtime, crun, refuses a host whose cgroups mix v1 and v2 ("hybrid
    mode"), where runc runs (docker/cpu-image.sh installs both): runc where crun cannot."""
    import resource

    files = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    procs = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], 32768)
    limits = [f"--ulimit=nofile={files}:{files}", f"--ulimit=nproc={procs}:{procs}"]
    errors = []
    for options in (limits, [*limits, "--runtime=runc"]):
        probe = subprocess.run(["podman", "run", "--rm", *options, "--entrypoint=true", tag],
                               capture_output=True, text=True, timeout=120)
        if probe.returncode == 0:
            return options
        errors.append(f"{' '.join(options)}: {probe.stderr.strip()[-1500:]}")
    raise AssertionError(f"podman cannot start {tag} here:\n" + "\n".join(errors))


def _sessions(run_dir: Path) -> Path:
    """One empty file per test session using the cluster, named by its pid."""
    return run_dir / "test-sessions"


@contextlib.contextmanager
def _cluster_lock(run_dir: Path):
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "test-sessions.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _start_cluster() -> tuple[dict[str, str], bool]:
    """Run start.sh (it returns at once when the cluster is up): its SLURM_CONF line, and
    whether it started the cluster."""
    try:
        proc = subprocess.run(
            ["bash", str(TESTCLUSTER / "start.sh")],
            capture_output=True, text=True, timeout=START_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"start.sh took over {START_TIMEOUT_S}s:\n{e.stderr}", pytrace=False)
    if proc.returncode == 2:
        _unavailable(f"start.sh: not root\n{proc.stderr[-2000:]}")
    if proc.returncode == 3:
        _unavailable(f"start.sh could not install Slurm with apt:\n{proc.stderr[-3000:]}")
    if proc.returncode != 0:
        pytest.fail(f"start.sh failed (status {proc.returncode}):\n{proc.stderr[-6000:]}", pytrace=False)
    env = dict(line.split("=", 1) for line in proc.stdout.splitlines() if line.startswith("SLURM_CONF="))
    assert env, f"start.sh printed no SLURM_CONF:\n{proc.stdout}"
    return env, "idle in partition debug (started in" in proc.stderr
