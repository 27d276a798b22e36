"""Our indexed datasets are Megatron's, byte for byte: megatron-core reads ours and we read its."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch

from engine.data.indexed import HEADER, IndexedDataset, IndexedDatasetWriter, token_dtype
from engine.errors import InputError
from engine.manifest import Manifest, sha256_file, write_manifest

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


def test_megatron_multimodal_dataset_loads(tmp_path):
    """megatron-core's multimodal datasets append one mode byte per sequence to the .idx."""
    docs = _docs(4, 9, 512)
    builder = megatron_indexed.IndexedDatasetBuilder(str(tmp_path / "mm.bin"), dtype=np.uint16,
                                                     multimodal=True)
    for d in docs:
        builder.add_document(torch.tensor(d), [len(d)], modes=[1])
    builder.finalize(str(tmp_path / "mm.idx"))
    ours = IndexedDataset(tmp_path / "mm")
    assert [ours[i].tolist() for i in range(len(ours))] == [d.tolist() for d in docs]


def _edit(path, offset: int, value: np.ndarray) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + value.nbytes] = value.tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("field,value,message", [
    ("n_seq", 10, r"t\.idx: header says 10 sequences, but the file holds 20"),
    ("n_doc", 11, r"t\.idx: 442 bytes, but its header \(20 sequences, 11 document indices\) "
                  r"needs 362: truncated or corrupt"),
    ("length", -5, r"t\.idx: sequence 3 has a negative length \(-5\)"),
    ("length", 7, r"t\.idx: sequence 4 starts at byte \d+, but the lengths before it end at "
                  r"byte \d+"),
    ("pointer", 2, r"t\.idx: sequence 1 starts at byte 2, but the lengths before it end at"),
    ("last_doc", 19, r"t\.idx: document indices must run from 0 to the sequence count 20, "
                     r"they run from 0 to 19"),
    ("doc", 9, r"t\.idx: document index 6 \(6\) is below the one before it \(9\)"),
    ("version", 2, r"t\.idx: unsupported \.idx version 2"),
    ("code", 9, r"t\.idx: unknown dtype code 9"),
])
def test_index_structure_is_checked_on_open(tmp_path, field, value, message):
    """An edited header or array is refused when the dataset is opened, naming file and field."""
    _write_ours(tmp_path / "t", _docs(5, 20, 512), np.uint16)
    idx = tmp_path / "t.idx"
    n = 20
    lengths = HEADER.size  # where the three arrays start
    pointers, docs = lengths + 4 * n, lengths + 12 * n
    where = {"version": (9, np.uint64), "code": (17, np.uint8), "n_seq": (18, np.uint64),
             "n_doc": (26, np.uint64), "length": (lengths + 4 * 3, np.int32),
             "pointer": (pointers + 8, np.int64), "last_doc": (docs + 8 * n, np.int64),
             "doc": (docs + 8 * 5, np.int64)}
    offset, dtype = where[field]
    _edit(idx, offset, np.array([value], dtype=dtype))
    with pytest.raises(InputError, match=message):
        IndexedDataset(tmp_path / "t")


def test_bin_size_must_match_the_index(tmp_path):
    _write_ours(tmp_path / "t", _docs(6, 20, 512), np.uint16)
    data = (tmp_path / "t.bin").read_bytes()
    (tmp_path / "t.bin").write_bytes(data + bytes(4))
    with pytest.raises(InputError, match=rf"t\.bin: {len(data) + 4} bytes, but its index accounts "
                                         rf"for {len(data)}: the \.bin and \.idx do not belong"):
        IndexedDataset(tmp_path / "t")


def _tokenized(tmp_path) -> list[str]:
    """Datasets `p_<key>_document` described by one manifest `p.manifest.json`, as tokenize
    writes them."""
    prefixes = []
    for i, key in enumerate(("text", "title")):
        prefix = tmp_path / f"p_{key}_document"
        _write_ours(prefix, _docs(7 + i, 20, 512), np.uint16)
        prefixes.append(prefix)
    files = {f"{p.name}.{ext}": sha256_file(f"{p}.{ext}")
             for p in prefixes for ext in ("bin", "idx")}
    write_manifest(tmp_path / "p", Manifest(kind="dataset", stage="tokenize", spec={},
                                            fingerprint="f", files=files))
    return prefixes


def _flip_bit(path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_checksums_of_a_dataset_with_a_manifest(tmp_path, caplog):
    text, title = _tokenized(tmp_path)
    with caplog.at_level(logging.INFO, logger="engine.data.indexed"):
        IndexedDataset(text)
    assert re.search(r"p_text_document: checksums of \d+\.\d MB verified in \d+\.\d+s", caplog.text)
    _flip_bit(tmp_path / "p_title_document.bin", 100)
    IndexedDataset(text)  # only the prefix's own files are checked
    message = r"p_title_document\.bin: checksum mismatch \(sha256 [0-9a-f]{16}…, recorded "
    with pytest.raises(InputError, match=message + r"[0-9a-f]{16}…\): the file is corrupt"):
        IndexedDataset(title)
    _flip_bit(tmp_path / "p_text_document.bin", 10)  # a token id: the structure stays valid
    with pytest.raises(InputError, match=r"p_text_document\.bin: checksum mismatch"):
        IndexedDataset(text)
