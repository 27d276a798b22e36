"""Where the seconds go before a stage says anything: the CLI's help, the flow process's imports,
and a tokenize job on the local profile (submission, the job's process, the engine's own start,
the first log line of the stage, the end). Each is the median of --repeat fresh processes.

    .venv/bin/python -m bench.startup [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBES = {
    "python -m engine --help": ["-m", "engine", "--help"],
    "python -m engine pretrain --help": ["-m", "engine", "pretrain", "--help"],
    "import flows.lifecycle (the flow process)": ["-c", "import flows.lifecycle"],
    "python -c 'import torch' (for scale)": ["-c", "import torch"],
}


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - start


def tokenize_job(root: Path) -> dict[str, float]:
    """Seconds from submission to the job's first line, the stage's first line, and the end."""
    from cluster.submit import submit

    start = time.perf_counter()
    job = submit("tokenize", {"input": [str(root / "corpus")], "output_prefix": str(root / "ds"),
                              "tokenizer": str(root / "tok"), "progress": False},
                 profile="local", run_dir=root / f"run-{time.monotonic_ns()}")
    seen: dict[str, float] = {"submitted": time.perf_counter() - start}

    def on_line(line: str) -> None:
        key = "job's first line" if line.startswith("[cluster]") else "stage's first line"
        seen.setdefault(key, time.perf_counter() - start)

    job.wait_sync(300, on_line=on_line, poll_s=0.05)
    seen["done"] = time.perf_counter() - start
    (root / "ds_text_document.bin").unlink()
    (root / "ds_text_document.idx").unlink()
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}")
    for name, probe in PROBES.items():
        times = [timed(probe) for _ in range(args.repeat)]
        print(f"| {name} | {statistics.median(times):.2f} s |")
    from engine.data import synthetic, train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthetic.run(synthetic.Spec(output=str(root / "corpus"), documents=200, shards=1))
        train_tokenizer.run(train_tokenizer.Spec(input=[str(root / "corpus")],
                                                 output=str(root / "tok"), vocab_size=512))
        runs = [tokenize_job(root) for _ in range(args.repeat)]
    for key in runs[0]:
        print(f"| tokenize job (local profile): {key} | "
              f"{statistics.median(r[key] for r in runs):.2f} s |")


if __name__ == "__main__":
    main()
