"""Our indexed datasets are Megatron's, byte for byte: megatron-core reads ours and we read its."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.data.indexed import IndexedDataset, IndexedDatasetWriter, token_dtype
from engine.errors import InputError

megatron_indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")


def _docs(seed: int, n: int, vocab: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=rng.integers(1, 300)) for _ in range(n)]


def _write_ours(prefix, docs, dtype):
    with open(f"{prefix}.bin", "wb") as f:
        w = IndexedDatasetWriter(f, dtype)
        w.add_documents(np.concatenate(docs[:10]), [len(d) for d in docs[:10]])
        w.add_documents(np.concatenate(docs[10:]), [len(d) for d in docs[10:]])
    with open(f"{prefix}.idx", "wb") as f:
        w.finish(f)


@pytest.mark.parametrize("vocab", [512, 32000, 100_000])
def test_megatron_reads_ours(tmp_path, vocab):
    docs = _docs(0, 57, vocab)
    dtype = token_dtype(vocab)
    _write_ours(tmp_path / "ours", docs, dtype)
    ref = megatron_indexed.IndexedDataset(str(tmp_path / "ours"))
    assert len(ref) == len(docs)
    assert list(ref.document_indices) == list(range(len(docs) + 1))
    for i, d in enumerate(docs):
        got = ref[i]
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, d)
    np.testing.assert_array_equal(ref.get(5, offset=3, length=4), docs[5][3:7])


@pytest.mark.parametrize("vocab", [512, 100_000])
def test_ours_byte_identical_to_megatron_builder(tmp_path, vocab):
    docs = _docs(1, 33, vocab)
    dtype = token_dtype(vocab)
    builder = megatron_indexed.IndexedDatasetBuilder(str(tmp_path / "mc.bin"), dtype=dtype.type)
    for d in docs:
        builder.add_document(torch.tensor(d), [len(d)])
    builder.finalize(str(tmp_path / "mc.idx"))
    _write_ours(tmp_path / "ours", docs, dtype)
    for ext in ("bin", "idx"):
        assert (tmp_path / f"mc.{ext}").read_bytes() == (tmp_path / f"ours.{ext}").read_bytes()


def test_we_read_megatron_multi_sentence_documents(tmp_path):
    """Megatron datasets built with sentence splitting have several sequences per document."""
    rng = np.random.default_rng(2)
    builder = megatron_indexed.IndexedDatasetBuilder(str(tmp_path / "mc.bin"), dtype=np.int32)
    sequences = []
    for _ in range(12):
        sents = [rng.integers(0, 70000, size=rng.integers(1, 40)) for _ in range(rng.integers(1, 5))]
        builder.add_document(torch.tensor(np.concatenate(sents)), [len(s) for s in sents])
        sequences.extend(sents)
    builder.finalize(str(tmp_path / "mc.idx"))
    ref = megatron_indexed.IndexedDataset(str(tmp_path / "mc"))
    ours = IndexedDataset(tmp_path / "mc")
    assert ours.dtype == np.int32
    assert len(ours) == len(sequences)
    np.testing.assert_array_equal(ours.document_indices, ref.document_indices)
    np.testing.assert_array_equal(ours.sequence_lengths, ref.sequence_lengths)
    for i, s in enumerate(sequences):
        np.testing.assert_array_equal(ours[i], s)
        np.testing.assert_array_equal(ours[i], ref[i])


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        IndexedDataset(tmp_path / "missing")
    (tmp_path / "x.idx").write_bytes(b"NOTANIDX" + bytes(40))
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(InputError, match=r"x\.idx: not a Megatron \.idx"):
        IndexedDataset(tmp_path / "x")
    docs = _docs(3, 20, 512)
    _write_ours(tmp_path / "t", docs, np.uint16)
    data = (tmp_path / "t.bin").read_bytes()
    (tmp_path / "t.bin").write_bytes(data[:-2])
    with pytest.raises(InputError, match=r"t\.bin: truncated"):
        IndexedDataset(tmp_path / "t")
