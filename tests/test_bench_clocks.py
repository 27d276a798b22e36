"""The benchmarks' clock and power sampling (bench/clocks.py): nvidia-smi's lines summarised,
and the sampler's child process started and read around a `with` body. On a GPU machine
`python -m bench.train_step` prints the result in its SM MHz and W columns."""

from __future__ import annotations

import os
import stat
import time

import pytest

from bench.clocks import ClockSampler, summarise


def test_summary_of_nvidia_smi_lines():
    lines = ["1530, 691.09, 700.00, 0x0000000000000004",
             "1560, 688.91, 700.00, 0x0000000000000004",
             "1980, 241.10, 700.00, 0x0000000000000000",
             "[N/A], 80.0, 700.00, 0x0000000000000001",  # unreadable clock: skipped
             "1545, 69"]  # a line cut off when the sampler was stopped
    s = summarise(lines)
    assert s.samples == 3
    assert s.sm_mhz == 1560  # median, not mean (1690)
    assert s.power_w == pytest.approx((691.09 + 688.91 + 241.10) / 3)
    assert s.limit_w == 700
    assert s.capped == pytest.approx(2 / 3)  # the SW power cap bit, 0x4
    assert summarise(["", "garbage"]) is None


def test_sampler_reads_the_child_it_started(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"  # prints one sample per period until terminated
    fake.write_text("#!/bin/sh\necho \"$@\" > \"$(dirname \"$0\")/args\"\n"
                    "while true; do echo '1500, 690.5, 700.00, 0x4'; sleep 0.02; done\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with ClockSampler(0, period_ms=20) as clocks:
        time.sleep(0.3)
    assert clocks.summary is not None and clocks.summary.samples >= 3
    assert (clocks.summary.sm_mhz, clocks.summary.capped) == (1500, 1.0)
    args = (tmp_path / "args").read_text()
    assert "--loop-ms=20" in args and "clocks.sm,power.draw" in args
    assert clocks._proc.poll() is not None  # stopped with the with-block


def test_sampler_without_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with ClockSampler(0) as clocks:
        pass
    assert clocks.summary is None
