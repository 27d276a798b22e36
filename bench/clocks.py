"""The GPU's SM clock and power draw while a benchmark runs, sampled by nvidia-smi.

A training step of the 1.1B shape holds an H200 at its 700 W power cap: the SM clock then sits
near 1,600 MHz instead of 1,980, and how far it drops differs between machines of one model. A
rate without the clock it ran at cannot be compared across machines, so the benchmarks print both.

    with ClockSampler(torch.cuda.current_device()) as clocks:
        run()
    clocks.summary  # None where nvidia-smi is missing or failed
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import subprocess

import torch

# nvidia-smi's clocks_throttle_reasons.active bit for "SW Power Cap" (the board's power limit).
POWER_CAP = 0x4
FIELDS = "clocks.sm,power.draw,power.limit,clocks_throttle_reasons.active"


@dataclasses.dataclass(frozen=True)
class ClockSummary:
    sm_mhz: float  # median SM clock over the samples
    power_w: float  # mean board power draw
    limit_w: float  # the board's power limit
    capped: float  # share of samples with the power cap active
    samples: int


def summarise(lines: list[str]) -> ClockSummary | None:
    """Summary of nvidia-smi `--format=csv,noheader,nounits` lines of FIELDS; lines that do not
    parse (a field "[N/A]", a partial last line) are skipped."""
    rows = []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            rows.append((float(parts[0]), float(parts[1]), float(parts[2]), int(parts[3], 16)))
        except ValueError:
            continue
    if not rows:
        return None
    return ClockSummary(sm_mhz=statistics.median(r[0] for r in rows),
                        power_w=statistics.fmean(r[1] for r in rows), limit_w=rows[-1][2],
                        capped=sum(bool(r[3] & POWER_CAP) for r in rows) / len(rows),
                        samples=len(rows))


def _gpu_id(device_index: int) -> str:
    """nvidia-smi's name for torch's device: its UUID (CUDA_VISIBLE_DEVICES renumbers devices)."""
    if torch.cuda.is_available():
        return f"GPU-{torch.cuda.get_device_properties(device_index).uuid}"
    return str(device_index)


class ClockSampler:
    """Samples the GPU every `period_ms` while the `with` body runs (nvidia-smi in a child
    process, so the benchmark's own thread is not disturbed)."""

    def __init__(self, device_index: int, period_ms: int = 100):
        self.device_index = device_index
        self.period_ms = period_ms
        self.summary: ClockSummary | None = None
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> "ClockSampler":
        exe = shutil.which("nvidia-smi")
        if exe is not None:
            self._proc = subprocess.Popen(
                [exe, f"--id={_gpu_id(self.device_index)}", f"--query-gpu={FIELDS}",
                 "--format=csv,noheader,nounits",
                 f"--loop-ms={self.period_ms}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        out, _ = self._proc.communicate()
        self.summary = summarise(out.splitlines())
