"""Seconds to build sample indices for 1e9 tokens (synthetic lengths, no files) and a blend order.

    .venv/bin/python bench/samples_index.py
"""

import time

import numpy as np

from engine.data.samples import blend_indices, build_indices

TOKENS = 1_000_000_000
SEQ_LEN = 4096


def timed(label: str, fn) -> None:
    t0 = time.perf_counter()
    fn()
    print(f"{label}: {time.perf_counter() - t0:.2f}s")


for mean_len in (1000, 100):
    lengths = np.random.default_rng(0).integers(1, 2 * mean_len, size=TOKENS // mean_len,
                                                dtype=np.int32)
    n = int(lengths.sum(dtype=np.int64)) // SEQ_LEN
    for epochs in (1, 3):
        timed(f"{len(lengths):,} docs, {lengths.sum(dtype=np.int64):,} tokens, "
              f"{epochs * n:,} samples of {SEQ_LEN}",
              lambda: build_indices(lengths, (0, len(lengths)), SEQ_LEN, epochs * n, seed=1234))
for n in (10_000_000, 100_000_000):
    timed(f"blend order, 4 datasets, {n:,} samples",
          lambda: blend_indices([0.5, 0.3, 0.15, 0.05], n))
