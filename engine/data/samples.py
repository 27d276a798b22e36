"""Training samples: `seq_len + 1` tokens cut from documents laid end to end (Megatron GPTDataset).

One split of one dataset is three index arrays, built with numpy in one pass (cumsum +
searchsorted, no Python loop per sample or document) and cached next to the data:

- document order: the split's documents repeated for as many epochs as the samples need, shuffled;
- sample index: (position in the document order, token offset) where each sample starts, one row
  more than samples; sample s ends on the token where sample s+1 starts (one token of overlap, so
  inputs and labels are both `seq_len` long);
- shuffle index: the order in which the samples are served.

Randomness is `np.random.RandomState(seed)` used exactly as Megatron-LM uses it (same draws, same
order, same "separate final epoch" rule), so for a seed, split and sample count the three arrays are
Megatron's own and a run reads the same tokens in the same order as it would under Megatron-LM.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from engine.atomic import temp_name
from engine.data.indexed import IndexedDataset, data_path, index_path
from engine.errors import InputError, SpecError

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
INDEX_VERSION = 1  # part of the cache key: bump when the arrays' meaning changes
FINAL_EPOCH_THRESHOLD = 0.80  # Megatron: a last epoch giving fewer samples is shuffled on its own
BLEND_SURPLUS = 0.005  # Megatron: each blended dataset builds 0.5% more samples than its share
INDEX_NAMES = ("doc_order", "sample_index", "shuffle_index")


def parse_split(split: str) -> tuple[float, float, float]:
    """"969,30,1" -> normalised (train, valid, test) weights; missing parts are 0."""
    parts = [p.strip() for p in str(split).split(",")]
    if len(parts) > 3:
        raise SpecError(f"split '{split}': at most 3 weights (train,valid,test), got {len(parts)}")
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise SpecError(f"split '{split}': weights must be numbers, e.g. '969,30,1'") from None
    if not all(math.isfinite(w) and w >= 0 for w in weights):
        raise SpecError(f"split '{split}': weights must be finite and >= 0")
    total = sum(weights)
    if total <= 0:
        raise SpecError(f"split '{split}': at least one weight must be > 0")
    weights += [0.0] * (3 - len(weights))
    return tuple(w / total for w in weights)  # type: ignore[return-value]


def split_ranges(weights: Sequence[float], num_docs: int) -> list[tuple[int, int]]:
    """Document ranges of the splits, as Megatron cuts them: bounds round(cumulative weight * n)."""
    bounds, acc = [0], 0.0
    for w in weights[:-1]:
        acc += w
        bounds.append(min(int(round(acc * num_docs)), num_docs))
    bounds.append(num_docs)
    return list(zip(bounds[:-1], bounds[1:]))


def parse_blend(items: Sequence[str]) -> list[tuple[float, str]]:
    """Megatron's `--data-path`: one prefix, or "w1 prefix1 w2 prefix2 ..."; weights normalised."""
    items = [str(s).strip() for s in items]
    if len(items) == 1 and items[0]:
        return [(1.0, items[0])]
    example = "e.g. ['0.3', '/data/a', '0.7', '/data/b'] or a single prefix"
    if not items or len(items) % 2:
        raise SpecError(f"blend {items}: several datasets need a weight each, {example}")
    pairs = []
    for raw, prefix in zip(items[::2], items[1::2]):
        try:
            w = float(raw)
        except ValueError:
            raise SpecError(f"blend {items}: '{raw}' is not a weight, {example}") from None
        if not (math.isfinite(w) and w > 0):
            raise SpecError(f"blend {items}: weight '{raw}' of '{prefix}' must be > 0")
        if not prefix:
            raise SpecError(f"blend {items}: empty dataset prefix after weight '{raw}'")
        pairs.append((w, prefix))
    total = sum(w for w, _ in pairs)
    return [(w / total, p) for w, p in pairs]


def _shuffled(a: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    rng.shuffle(a)
    return a


def documents_of(lengths: np.ndarray, doc_range: tuple[int, int],
                 min_length: int = 0) -> np.ndarray:
    """The documents of a range that hold at least `min_length` tokens (all for 0), in order."""
    beg, end = doc_range
    docs = np.arange(beg, end, dtype=np.int32)
    return docs[np.asarray(lengths[beg:end]) >= min_length] if min_length else docs


def check_long_documents(blend: Sequence[str], split: str, min_length: int) -> None:
    """InputError naming the first dataset of the blend whose train split has no document of
    `min_length` tokens; datasets not written yet are left to the stage."""
    for _, prefix in parse_blend(blend):
        if not index_path(prefix).is_file():
            continue
        lengths = IndexedDataset(prefix, verify=False).sequence_lengths
        train = split_ranges(parse_split(split), len(lengths))[0]
        if not len(documents_of(lengths, train, min_length)):
            longest = int(lengths[slice(*train)].max(initial=0))
            raise InputError(f"{prefix}: no document of its train split holds {min_length} "
                             f"tokens (the longest holds {longest})")


def build_indices(lengths: np.ndarray, doc_range: tuple[int, int], seq_len: int,
                  num_samples: int, seed: int,
                  min_length: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Document order, sample index and shuffle index for `num_samples` samples of a range,
    cut from its documents of at least `min_length` tokens (all of them for 0).

    Takes only the sequence lengths, so it can be timed without files (bench/samples_index.py).
    The index holds every sample of the epochs built (at least `num_samples`), as Megatron's does.
    """
    lengths = np.asarray(lengths)
    docs = documents_of(lengths, doc_range, min_length)
    tokens_per_epoch = int(lengths[docs].sum(dtype=np.int64))
    if tokens_per_epoch == 0 and min_length:
        longest = int(lengths[slice(*doc_range)].max(initial=0))
        raise InputError(f"no document of {list(doc_range)} holds {min_length} tokens or more "
                         f"(the longest holds {longest}): no samples can be cut")
    if tokens_per_epoch == 0:
        raise InputError(f"documents {list(doc_range)} hold no tokens: no samples can be cut")
    epochs = max(1, -(-(num_samples * seq_len + 1) // tokens_per_epoch))
    # A final epoch that is mostly unused is kept apart, so the epochs before it stay complete.
    separate_final = False
    if epochs > 1:
        before_final = ((epochs - 1) * tokens_per_epoch - 1) // seq_len
        per_epoch = (tokens_per_epoch - 1) // seq_len
        separate_final = num_samples - before_final < int(FINAL_EPOCH_THRESHOLD * per_epoch)
    rng = np.random.RandomState(seed)
    if separate_final:
        doc_order = np.concatenate([_shuffled(np.tile(docs, epochs - 1), rng),
                                    _shuffled(docs.copy(), rng)])
    else:
        doc_order = _shuffled(np.tile(docs, epochs), rng)

    total = (epochs * tokens_per_epoch - 1) // seq_len
    doc_ends = np.zeros(len(doc_order) + 1, dtype=np.int64)
    np.cumsum(lengths[doc_order], dtype=np.int64, out=doc_ends[1:])
    starts = np.arange(total + 1, dtype=np.int64) * seq_len
    # side="right" puts a start on a document boundary in the next non-empty document.
    position = np.searchsorted(doc_ends, starts, side="right") - 1
    sample_index = np.stack([position, starts - doc_ends[position]], axis=1)

    first = before_final if separate_final else total
    shuffle_index = _shuffled(np.arange(first, dtype=np.int64), rng)
    if first < total:
        shuffle_index = np.concatenate(
            [shuffle_index, _shuffled(np.arange(first, total, dtype=np.int64), rng)])
    return doc_order, sample_index, shuffle_index


def _save(arrays: Sequence[np.ndarray], paths: Sequence[Path]) -> None:
    """All files under temporary names first, then renamed: readers never see half an index."""
    tmps = [temp_name(p) for p in paths]
    try:
        for tmp, a in zip(tmps, arrays):
            with open(tmp, "wb") as f:
                np.save(f, a)
        for tmp, final in zip(tmps, paths):
            os.replace(tmp, final)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def _cached(prefix: str, key: dict, build: Callable[[], tuple[np.ndarray, ...]],
            cache_dir: str | Path | None) -> tuple[np.ndarray, ...]:
    """Load the index named by a hash of `key` next to the data (or in cache_dir), else build it.

    The key holds the size and mtime of the `.idx`/`.bin`, so rewriting a dataset rebuilds its
    indices. A read-only data folder falls back to cache_dir; with neither writable the index
    only lives in memory.
    """
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    base = f"{Path(prefix).name}.samples-{digest}"
    folders = [Path(prefix).parent] + ([Path(cache_dir)] if cache_dir is not None else [])
    for folder in folders:
        paths = [folder / f"{base}.{name}.npy" for name in INDEX_NAMES]
        if all(p.is_file() for p in paths):
            return tuple(np.load(p, mmap_mode="r") for p in paths)
    t0 = time.perf_counter()
    arrays = build()
    log.info("built sample index %s in %.2fs", base, time.perf_counter() - t0)
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _save(arrays, [folder / f"{base}.{name}.npy" for name in INDEX_NAMES])
            return arrays
        except OSError as exc:
            log.warning("cannot cache sample index in %s: %s", folder, exc)
    return arrays


class GPTSamples:
    """`num_samples` samples of documents [beg, end) of one dataset (those of at least
    `min_length` tokens), served in shuffled order. `documents`: (used, in the range)."""

    def __init__(self, dataset: IndexedDataset, doc_range: tuple[int, int], seq_len: int,
                 num_samples: int, seed: int, cache_dir: str | Path | None = None,
                 min_length: int = 0) -> None:
        beg, end = doc_range
        if not 0 <= beg <= end <= len(dataset):
            raise InputError(f"{dataset.prefix}: document range {doc_range} outside "
                             f"[0, {len(dataset)}]")
        if seq_len < 1 or num_samples < 0:
            raise SpecError(f"seq_len must be >= 1 and num_samples >= 0 "
                            f"(got {seq_len}, {num_samples})")
        self.dataset, self.seq_len, self.num_samples = dataset, seq_len, num_samples
        self.documents = (len(documents_of(dataset.sequence_lengths, doc_range, min_length)),
                          end - beg)
        files = [[p.stat().st_size, p.stat().st_mtime_ns]
                 for p in (index_path(dataset.prefix), data_path(dataset.prefix))]
        key = {"version": INDEX_VERSION, "files": files, "doc_range": [beg, end],
               "seq_len": seq_len, "num_samples": num_samples, "seed": seed,
               "min_length": min_length}
        self.doc_order, self.sample_index, self.shuffle_index = _cached(
            dataset.prefix, key,
            lambda: build_indices(dataset.sequence_lengths, (beg, end), seq_len, num_samples, seed,
                                  min_length),
            cache_dir)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        return self.tokens(int(self.shuffle_index[i]))

    def tokens(self, s: int) -> np.ndarray:
        """Sample s in document order (before shuffling): seq_len + 1 tokens as int64."""
        (p0, o0), (p1, o1) = self.sample_index[s], self.sample_index[s + 1]
        get, order = self.dataset.get, self.doc_order
        if p0 == p1:
            parts = [get(order[p0], o0, o1 - o0 + 1)]
        else:
            parts = ([get(order[p0], o0)] + [get(order[p]) for p in range(p0 + 1, p1)]
                     + [get(order[p1], 0, o1 + 1)])
        return np.concatenate(parts).astype(np.int64)


def blend_count_bound(weight: float, num_samples: int, num_datasets: int) -> int:
    """Most samples blend_indices can take from a dataset of this weight (see its bound)."""
    return math.floor(weight * num_samples + (num_datasets - 1) / 2) + 1


def blend_indices(weights: Sequence[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset, sample within it) for each position of a blend, following the weights closely.

    Megatron's greedy C++ loop (take the dataset furthest behind its share) cannot be vectorised,
    so the order here is the Sainte-Laguë sequence instead: the j-th sample of dataset d is due at
    time (j + 1/2) / w_d and positions go to due times in increasing order, ties to the lower
    dataset id -- the same as picking argmin_d (c_d + 1/2) / w_d at each step. It is one stable
    sort of D sorted runs. After any prefix of k samples, |c_d - w_d k| <= 1/2 + w_d (D - 2) / 2:
    at most 1/2 for two datasets, below 1 for three. (The greedy loop gets no better bound: it
    reaches 1.8 on some weights.)
    """
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or not np.all(w > 0):
        raise SpecError(f"blend weights must be > 0, got {list(weights)}")
    w = w / w.sum()
    counts = [blend_count_bound(wd, num_samples, len(w)) for wd in w]
    due = np.concatenate([(np.arange(c, dtype=np.float64) + 0.5) / wd for wd, c in zip(w, counts)])
    order = np.argsort(due, kind="stable")[:num_samples]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    dataset_index = np.repeat(np.arange(len(w), dtype=np.int16), counts)[order]
    return dataset_index, order - starts[dataset_index]


class BlendedSamples:
    """`num_samples` samples drawn from several sample sets in the proportions of `weights`."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], num_samples: int) -> None:
        if len(datasets) != len(weights):
            raise SpecError(f"{len(datasets)} datasets but {len(weights)} weights")
        self.datasets, self.num_samples = list(datasets), num_samples
        self.dataset_index, self.dataset_sample_index = blend_indices(weights, num_samples)
        self.documents = tuple(sum(part) for part in zip(*(d.documents for d in datasets)))
        counts = np.bincount(self.dataset_index, minlength=len(datasets))
        for d, (ds, need) in enumerate(zip(self.datasets, counts)):
            if len(ds) < need:
                raise InputError(f"blend needs {need} samples from dataset {d}, it has {len(ds)}")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        return self.datasets[self.dataset_index[i]][int(self.dataset_sample_index[i])]


def build_samples(blend: Sequence[str], split: str, seq_len: int,
                  num_samples: Sequence[int] | Mapping[str, int], seed: int,
                  cache_dir: str | Path | None = None, verify: bool = True,
                  min_length: int = 0) -> dict[str, GPTSamples | BlendedSamples]:
    """The train/valid/test sample sets of a blend; splits asked for 0 samples are left out.

    Every dataset is split by `split` on its own (as in Megatron); a blended dataset builds
    ceil(ceil(w n) * 1.005) samples (Megatron's margin), or more if the blend order needs them.
    Samples are cut from the documents of at least `min_length` tokens (0: all).
    `verify=False` skips the datasets' checksums (another rank has just checked them).
    """
    sources = parse_blend(blend)
    fractions = parse_split(split)
    if isinstance(num_samples, Mapping):
        unknown = set(num_samples) - set(SPLITS)
        if unknown:
            raise SpecError(f"num_samples: unknown splits {sorted(unknown)} (use {SPLITS})")
        wanted = dict(num_samples)
    else:
        wanted = dict(zip(SPLITS, num_samples))
    # opened once per prefix: opening verifies the files, which costs a read of them
    opened = {prefix: IndexedDataset(prefix, verify)
              for prefix in dict.fromkeys(p for _, p in sources)}
    datasets = [opened[prefix] for _, prefix in sources]
    result: dict[str, GPTSamples | BlendedSamples] = {}
    for i, name in enumerate(SPLITS):
        n = int(wanted.get(name, 0))
        if n <= 0:
            continue
        if fractions[i] == 0:
            raise SpecError(f"{n} {name} samples asked for, but split '{split}' gives {name} "
                            f"no documents")
        parts = []
        for (w, _), ds in zip(sources, datasets):
            own = n if len(sources) == 1 else max(
                math.ceil(math.ceil(n * w) * (1 + BLEND_SURPLUS)),
                blend_count_bound(w, n, len(sources)))
            parts.append(GPTSamples(ds, split_ranges(fractions, len(ds))[i], seq_len, own, seed,
                                    cache_dir, min_length))
        result[name] = (parts[0] if len(parts) == 1
                        else BlendedSamples(parts, [w for w, _ in sources], n))
    return result
