"""Training samples: contents against a brute-force concatenation of documents, epochs, splits,
blends, the on-disk index cache, and (slow) identity with Megatron-LM's GPTDataset."""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import pytest

from engine.data import samples
from engine.data.indexed import IndexedDataset, IndexedDatasetWriter
from engine.data.samples import (BlendedSamples, GPTSamples, blend_count_bound, blend_indices,
                                 build_indices, build_samples, parse_blend, parse_split,
                                 split_ranges)
from engine.errors import InputError, SpecError
from engine.manifest import Manifest, sha256_file, write_manifest


def write_dataset(prefix, lengths, seed=0, vocab=30000) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, vocab, size=n) for n in lengths]
    with open(f"{prefix}.bin", "wb") as f:
        w = IndexedDatasetWriter(f, np.uint16)
        w.add_documents(np.concatenate(docs), lengths)
    with open(f"{prefix}.idx", "wb") as f:
        w.finish(f)
    return docs


def random_lengths(n, seed=1, high=40):
    lengths = np.random.default_rng(seed).integers(0, high, size=n)
    lengths[[0, 3, 7]] = 0  # empty documents are skipped over, never end a sample early
    return lengths


def stream(docs, doc_order):
    return np.concatenate([docs[d] for d in doc_order])


@pytest.mark.parametrize("lengths,doc_range,seq_len,num_samples", [
    (random_lengths(60), (0, 60), 16, 40),     # one epoch
    (random_lengths(60), (10, 50), 7, 300),    # several epochs, shuffled together
    (random_lengths(60), (0, 60), 16, 90),     # short last epoch, kept apart
    ([5, 0, 5, 5], (0, 4), 16, 10),            # whole dataset shorter than one sample
])
def test_samples_are_the_document_stream_cut_every_seq_len(tmp_path, lengths, doc_range, seq_len,
                                                           num_samples):
    docs = write_dataset(tmp_path / "ds", lengths)
    ds = GPTSamples(IndexedDataset(tmp_path / "ds"), doc_range, seq_len, num_samples, seed=7)
    beg, end = doc_range
    tokens_per_epoch = sum(lengths[beg:end])
    epochs = math.ceil((num_samples * seq_len + 1) / tokens_per_epoch)
    counts = np.bincount(ds.doc_order, minlength=len(lengths))
    assert set(counts[beg:end]) == {epochs} and counts[:beg].sum() + counts[end:].sum() == 0

    flat = stream(docs, ds.doc_order)
    total = (len(flat) - 1) // seq_len
    assert len(ds.sample_index) == total + 1 and total >= num_samples
    for s in range(total):
        got = ds.tokens(s)
        assert got.dtype == np.int64 and len(got) == seq_len + 1
        np.testing.assert_array_equal(got, flat[s * seq_len: s * seq_len + seq_len + 1])
    assert sorted(ds.shuffle_index.tolist()) == list(range(total))
    assert len(ds) == num_samples
    for i in range(num_samples):
        np.testing.assert_array_equal(ds[i], ds.tokens(ds.shuffle_index[i]))
    with pytest.raises(IndexError):
        ds[num_samples]


def test_consecutive_samples_share_one_token(tmp_path):
    write_dataset(tmp_path / "ds", random_lengths(50))
    ds = GPTSamples(IndexedDataset(tmp_path / "ds"), (0, 50), 12, 60, seed=3)
    for s in range(len(ds.sample_index) - 2):
        a, b = ds.tokens(s), ds.tokens(s + 1)
        assert a[-1] == b[0]


def test_same_seed_same_samples_other_seed_other_order(tmp_path):
    built = {}
    for name, seed in [("a", 11), ("b", 11), ("c", 12)]:  # own folders: every one is built
        (tmp_path / name).mkdir()
        write_dataset(tmp_path / name / "ds", random_lengths(300, high=100))
        built[name] = GPTSamples(IndexedDataset(tmp_path / name / "ds"), (0, 300), 32, 900, seed)
    a, b, c = built["a"], built["b"], built["c"]
    for x, y in [(a.doc_order, b.doc_order), (a.sample_index, b.sample_index),
                 (a.shuffle_index, b.shuffle_index)]:
        np.testing.assert_array_equal(x, y)
    assert all(np.array_equal(a[i], b[i]) for i in range(len(a)))
    assert not np.array_equal(a.doc_order, c.doc_order)
    assert not np.array_equal(a.shuffle_index, c.shuffle_index)
    assert not all(np.array_equal(a[i], c[i]) for i in range(len(a)))


def test_epochs_cover_each_token_at_most_ceil_epochs_times(tmp_path):
    lengths = random_lengths(80)
    write_dataset(tmp_path / "ds", lengths)
    seq_len, tokens_per_epoch = 10, int(lengths.sum())
    for n in (int(1.3 * tokens_per_epoch / seq_len), int(2.9 * tokens_per_epoch / seq_len)):
        ds = GPTSamples(IndexedDataset(tmp_path / "ds"), (0, 80), seq_len, n, seed=5)
        epochs = math.ceil((n * seq_len + 1) / tokens_per_epoch)
        # Each token of the stream is (document, offset); count how often served inputs hold it.
        doc_of = np.repeat(ds.doc_order, lengths[ds.doc_order])
        offset = np.concatenate([np.arange(lengths[d]) for d in ds.doc_order])
        used = np.concatenate([np.arange(s * seq_len, (s + 1) * seq_len)
                               for s in ds.shuffle_index[:n]])
        seen = np.zeros((80, lengths.max()), dtype=np.int64)
        np.add.at(seen, (doc_of[used], offset[used]), 1)
        assert seen.max() <= epochs
        covered = sum(int((seen[d, :lengths[d]] > 0).sum()) for d in range(80))
        assert covered >= tokens_per_epoch - seq_len
        assert seen.sum() == n * seq_len


def test_short_last_epoch_is_kept_apart():
    """1.3 epochs: the first epoch is complete, the partial second one comes after it."""
    lengths = np.full(100, 50)
    doc_order, sample_index, shuffle = build_indices(lengths, (0, 100), 50, 130, seed=0)
    assert sorted(doc_order[:100].tolist()) == list(range(100))
    assert set(shuffle[:99].tolist()) == set(range(99))  # (2 * 5000 - 1) // 50 = 199 samples


def test_split_parsing_and_document_ranges():
    assert parse_split("8,1,1") == pytest.approx((0.8, 0.1, 0.1))
    assert split_ranges(parse_split("8,1,1"), 10) == [(0, 8), (8, 9), (9, 10)]
    assert split_ranges(parse_split("969,30,1"), 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert parse_split("99, 1") == pytest.approx((0.99, 0.01, 0.0))
    assert split_ranges(parse_split("1"), 7) == [(0, 7), (7, 7), (7, 7)]
    assert split_ranges(parse_split("1,1,1"), 10) == [(0, 3), (3, 7), (7, 10)]
    for bad in ["", "a,b", "-1,2", "0,0,0", "1,2,3,4", "nan", "inf,1", "1,,1"]:
        with pytest.raises(SpecError):
            parse_split(bad)


def test_blend_parsing_megatron_form():
    assert parse_blend(["/data/a"]) == [(1.0, "/data/a")]
    got = parse_blend(["0.3", "/data/a", "0.7", "/data/b"])
    assert [p for _, p in got] == ["/data/a", "/data/b"]
    assert [w for w, _ in got] == pytest.approx([0.3, 0.7])
    assert [w for w, _ in parse_blend(["30", "a", "10", "b"])] == pytest.approx([0.75, 0.25])
    for bad in [[], ["a", "b"], ["a", "b", "c"], ["x", "a", "1", "b"], ["-1", "a"],
                ["0", "a", "1", "b"], ["1", ""], ["nan", "a"]]:
        with pytest.raises(SpecError):
            parse_blend(bad)


def reference_blend(weights, n):
    """The rule written out: each step takes argmin_d (c_d + 1/2) / w_d, lowest d on ties."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    counts = [0] * len(w)
    out = []
    for _ in range(n):
        d = min(range(len(w)), key=lambda e: ((counts[e] + 0.5) / w[e], e))
        out.append((d, counts[d]))
        counts[d] += 1
    return out


def blend_cases():
    rng = np.random.default_rng(0)
    cases = [[0.75, 0.25], [1, 1], [1, 1, 1], [0.7, 0.1, 0.1, 0.1], [0.98, 0.01, 0.01], [1.0]]
    for _ in range(30):
        d = int(rng.integers(2, 9))
        cases.append(rng.dirichlet(np.full(d, rng.choice([0.3, 1.0, 5.0]))) + 1e-3)
    return cases


def test_blend_order_small_case():
    di, dsi = blend_indices([0.75, 0.25], 8)
    assert di.tolist() == [0, 0, 1, 0, 0, 0, 1, 0]
    assert dsi.tolist() == [0, 1, 0, 2, 3, 4, 1, 5]


@pytest.mark.parametrize("weights", blend_cases())
def test_blend_order_equals_rule_and_stays_within_bound(weights):
    n = 700
    di, dsi = blend_indices(weights, n)
    assert list(zip(di.tolist(), dsi.tolist())) == reference_blend(weights, n)
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    k = np.arange(1, n + 1)[:, None]
    counts = np.cumsum(di[:, None] == np.arange(len(w))[None, :], axis=0)
    error = np.abs(counts - w[None, :] * k)
    assert np.all(error <= 0.5 + w * (len(w) - 2) / 2 + 1e-9)
    if len(w) <= 3:
        assert error.max() < 1
    assert all(counts[-1, d] <= blend_count_bound(w[d], n, len(w)) for d in range(len(w)))


def test_blended_samples_serve_each_dataset_in_its_own_order(tmp_path):
    write_dataset(tmp_path / "a", random_lengths(40, seed=1), seed=1)
    write_dataset(tmp_path / "b", random_lengths(30, seed=2), seed=2)
    a = GPTSamples(IndexedDataset(tmp_path / "a"), (0, 40), 8, 40, seed=1)
    b = GPTSamples(IndexedDataset(tmp_path / "b"), (0, 30), 8, 70, seed=1)
    blend = BlendedSamples([a, b], [0.3, 0.7], 100)
    assert len(blend) == 100
    assert np.bincount(blend.dataset_index).tolist() == [30, 70]
    for i in range(100):
        src = [a, b][blend.dataset_index[i]]
        np.testing.assert_array_equal(blend[i], src[int(blend.dataset_sample_index[i])])
    with pytest.raises(InputError, match="needs 70 samples from dataset 1, it has 69"):
        BlendedSamples([a, GPTSamples(IndexedDataset(tmp_path / "b"), (0, 30), 8, 69, seed=1)],
                       [0.3, 0.7], 100)


def test_build_samples_splits_and_blends(tmp_path):
    write_dataset(tmp_path / "a", random_lengths(100, seed=1), seed=1)
    write_dataset(tmp_path / "b", random_lengths(50, seed=2), seed=2)
    got = build_samples(["0.3", str(tmp_path / "a"), "0.7", str(tmp_path / "b")], "8,1,1",
                        seq_len=8, num_samples=(200, 20, 0), seed=9)
    assert set(got) == {"train", "valid"}
    train, valid = got["train"], got["valid"]
    assert isinstance(train, BlendedSamples) and len(train) == 200 and len(valid) == 20
    a, b = train.datasets
    assert len(a) == math.ceil(60 * 1.005) and len(b) == math.ceil(140 * 1.005)
    assert set(a.doc_order.tolist()) <= set(range(80))
    assert set(b.doc_order.tolist()) <= set(range(40))
    va, vb = valid.datasets
    assert set(va.doc_order.tolist()) <= set(range(80, 90))
    assert set(vb.doc_order.tolist()) <= set(range(40, 45))
    assert all(len(train[i]) == 9 for i in range(200))

    single = build_samples([str(tmp_path / "a")], "1", 8, {"train": 30}, seed=9)
    assert isinstance(single["train"], GPTSamples) and len(single["train"]) == 30
    with pytest.raises(SpecError, match="gives valid no documents"):
        build_samples([str(tmp_path / "a")], "1", 8, (10, 5, 0), seed=9)
    with pytest.raises(SpecError, match="unknown splits"):
        build_samples([str(tmp_path / "a")], "1", 8, {"training": 10}, seed=9)


def test_long_documents_only(tmp_path):
    """min_length keeps the documents of that many tokens (the samples are their stream, cut
    as usual), counts them per split and blend, and names the longest when none is left."""
    lengths = random_lengths(60, high=40)
    docs = write_dataset(tmp_path / "a", lengths)
    write_dataset(tmp_path / "b", random_lengths(30, seed=2, high=40), seed=2)
    got = build_samples(["1", str(tmp_path / "a"), "1", str(tmp_path / "b")], "5,1,0", seq_len=8,
                        num_samples=(50, 10, 0), seed=3, min_length=30)
    a = got["train"].datasets[0]
    assert set(a.doc_order.tolist()) == {d for d in range(50) if lengths[d] >= 30}
    flat = stream(docs, a.doc_order)
    for s in range(len(a.sample_index) - 1):
        np.testing.assert_array_equal(a.tokens(s), flat[s * 8: s * 8 + 9])
    assert a.documents == (sum(lengths[:50] >= 30), 50)
    assert got["train"].documents == (a.documents[0] + got["train"].datasets[1].documents[0], 75)
    assert build_samples([str(tmp_path / "a")], "5,1,0", 8, {"train": 5}, seed=3
                         )["train"].documents == (50, 50)
    with pytest.raises(InputError, match=rf"no document of \[0, 50\] holds 41 tokens or more "
                                         rf"\(the longest holds {max(lengths[:50])}\)"):
        build_samples([str(tmp_path / "a")], "5,1,0", 8, {"train": 5}, seed=3, min_length=41)
    with pytest.raises(InputError, match=f"{tmp_path / 'a'}: no document of its train split "
                                         f"holds 41 tokens"):
        samples.check_long_documents([str(tmp_path / "a")], "5,1,0", 41)
    samples.check_long_documents([str(tmp_path / "a")], "5,1,0", 30)
    samples.check_long_documents([str(tmp_path / "not-yet")], "5,1,0", 41)  # left to the stage


def test_blend_builds_enough_samples_where_megatrons_margin_is_short(tmp_path):
    """Weights 0.75 + 5 x 0.05, 8 samples: all 8 come from the first dataset, Megatron's
    ceil(ceil(8 * 0.75) * 1.005) = 7 would be one short."""
    blend = []
    for d, w in enumerate(["0.75"] + ["0.05"] * 5):
        write_dataset(tmp_path / f"d{d}", random_lengths(20, seed=d), seed=d)
        blend += [w, str(tmp_path / f"d{d}")]
    train = build_samples(blend, "1", seq_len=8, num_samples=(8, 0, 0), seed=1)["train"]
    assert train.dataset_index.tolist() == [0] * 8
    assert [len(ds) for ds in train.datasets] == [9, 3, 3, 3, 3, 3]
    assert all(len(train[i]) == 9 for i in range(8))


def cache_files(folder):
    return sorted(p.name for p in folder.iterdir() if ".samples-" in p.name)


def test_index_is_cached_next_to_the_data_reused_and_rebuilt(tmp_path, monkeypatch):
    write_dataset(tmp_path / "ds", random_lengths(40))
    first = GPTSamples(IndexedDataset(tmp_path / "ds"), (0, 40), 8, 50, seed=1)
    files = cache_files(tmp_path)
    assert len(files) == 3 and {f.split(".")[-2] for f in files} == set(samples.INDEX_NAMES)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    real_build = samples.build_indices
    monkeypatch.setattr(samples, "build_indices", lambda *a, **k: pytest.fail("not reused"))
    again = GPTSamples(IndexedDataset(tmp_path / "ds"), (0, 40), 8, 50, seed=1)
    for x, y in zip((first.doc_order, first.sample_index, first.shuffle_index),
                    (again.doc_order, again.sample_index, again.shuffle_index)):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(first[3], again[3])
    monkeypatch.setattr(samples, "build_indices", real_build)

    GPTSamples(IndexedDataset(tmp_path / "ds"), (0, 40), 8, 51, seed=1)  # other inputs, own files
    assert len(cache_files(tmp_path)) == 6
    # Same size, new mtime: rebuilt.
    st = os.stat(tmp_path / "ds.bin")
    os.utime(tmp_path / "ds.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    GPTSamples(IndexedDataset(tmp_path / "ds"), (0, 40), 8, 50, seed=1)
    assert len(cache_files(tmp_path)) == 9
    # New content: rebuilt, and the samples are the new documents'.
    docs = write_dataset(tmp_path / "ds", random_lengths(40, seed=4), seed=4)
    new = GPTSamples(IndexedDataset(tmp_path / "ds"), (0, 40), 8, 50, seed=1)
    assert len(cache_files(tmp_path)) == 12
    np.testing.assert_array_equal(new.tokens(5), stream(docs, new.doc_order)[40:49])


def test_read_only_data_folder_falls_back_to_cache_dir(tmp_path, monkeypatch):
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    write_dataset(data / "ds", random_lengths(40))
    real_save = samples._save

    def save(arrays, paths):
        if paths[0].parent == data:
            raise PermissionError(13, "Permission denied", str(paths[0]))
        real_save(arrays, paths)

    monkeypatch.setattr(samples, "_save", save)
    built = GPTSamples(IndexedDataset(data / "ds"), (0, 40), 8, 50, seed=1, cache_dir=cache)
    assert cache_files(data) == [] and len(cache_files(cache)) == 3
    monkeypatch.setattr(samples, "build_indices", lambda *a, **k: pytest.fail("not reused"))
    loaded = GPTSamples(IndexedDataset(data / "ds"), (0, 40), 8, 50, seed=1, cache_dir=cache)
    np.testing.assert_array_equal(built.shuffle_index, loaded.shuffle_index)
    # Nowhere writable: still served, from memory.
    monkeypatch.undo()
    monkeypatch.setattr(samples, "_save", lambda *a: (_ for _ in ()).throw(OSError(30, "EROFS")))
    mem = GPTSamples(IndexedDataset(data / "ds"), (0, 40), 8, 60, seed=1)
    assert len(mem[59]) == 9 and cache_files(data) == []


def test_bad_arguments_are_reported(tmp_path):
    write_dataset(tmp_path / "ds", [0, 0, 5, 0])
    ds = IndexedDataset(tmp_path / "ds")
    with pytest.raises(InputError, match="hold no tokens"):
        GPTSamples(ds, (0, 2), 8, 10, seed=1)
    with pytest.raises(InputError, match="outside"):
        GPTSamples(ds, (0, 5), 8, 10, seed=1)
    with pytest.raises(SpecError):
        GPTSamples(ds, (0, 4), 0, 10, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("seq_len,num_samples,doc_range,seed", [
    (16, 100, (0, 150), 1), (16, 1000, (0, 200), 3), (7, 900, (20, 180), 5),
    (32, 2, (150, 200), 0)])
def test_identical_to_megatron_gpt_dataset(tmp_path, seq_len, num_samples, doc_range, seed):
    gpt = pytest.importorskip("megatron.core.datasets.gpt_dataset")
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexed
    from megatron.core.datasets.utils import Split

    class Tokenizer:
        eod, pad, vocab_size, unique_identifiers = 0, 0, 30000, {"class": "test"}

    write_dataset(tmp_path / "ds", random_lengths(200, high=60))
    config = gpt.GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_len, blend=([str(tmp_path / "ds")], None),
        split="1,0,0", tokenizer=Tokenizer(), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, path_to_cache=str(tmp_path / "mc"))
    ref = gpt.GPTDataset(MegatronIndexed(str(tmp_path / "ds")), str(tmp_path / "ds"),
                         np.arange(*doc_range, dtype=np.int32), num_samples, Split.train, config)
    ours = GPTSamples(IndexedDataset(tmp_path / "ds"), doc_range, seq_len, num_samples, seed)
    np.testing.assert_array_equal(ours.doc_order, ref.document_index)
    np.testing.assert_array_equal(ours.sample_index, ref.sample_index)
    np.testing.assert_array_equal(ours.shuffle_index, ref.shuffle_index)
    for i in range(num_samples):
        np.testing.assert_array_equal(ours[i], ref._query_document_sample_shuffle_indices(i)[0])


def test_datasets_are_verified_once_before_any_index_is_built(tmp_path, caplog):
    """Training opens each prefix of a blend once, checking its manifest's checksums; a corrupt
    dataset stops it before a sample index is written."""
    prefix = tmp_path / "ds"
    write_dataset(prefix, random_lengths(40))
    files = {f"ds.{ext}": sha256_file(f"{prefix}.{ext}") for ext in ("bin", "idx")}
    write_manifest(prefix, Manifest(kind="dataset", stage="merge", spec={}, fingerprint="f",
                                    files=files))
    blend = ["0.5", str(prefix), "0.5", str(prefix)]
    with caplog.at_level(logging.INFO, logger="engine.data.indexed"):
        build_samples(blend, "1", 8, (20, 0, 0), seed=1)
    assert caplog.text.count("checksums of") == 1
    data = bytearray((tmp_path / "ds.bin").read_bytes())
    data[5] ^= 0x80
    (tmp_path / "ds.bin").write_bytes(bytes(data))
    for old in tmp_path.glob("*.samples-*"):
        old.unlink()
    with pytest.raises(InputError, match=r"ds\.bin: checksum mismatch"):
        build_samples(blend, "1", 8, (20, 0, 0), seed=2)
    assert cache_files(tmp_path) == []
