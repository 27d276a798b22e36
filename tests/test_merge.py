"""merge: concatenation that megatron-core reads; mismatches refused before writing."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import shared
from engine.data import merge, tokenize
from engine.data.indexed import HEADER, IndexedDataset, IndexedDatasetWriter
from engine.errors import InputError


def _tokenize(tmp_path, write_jsonl, name, texts, tok):
    src = write_jsonl(f"{name}.jsonl", [{"text": t} for t in texts])
    tokenize.run(tokenize.Spec(input=[str(src)], output_prefix=str(tmp_path / name),
                               tokenizer=str(tok), append_eod=True, progress=False))
    return str(tmp_path / f"{name}_text_document")


def _docs(prefix):
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def test_merge_concatenates_and_megatron_reads_it(tmp_path, write_jsonl, llama2_sp):
    mc = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    a = _tokenize(tmp_path, write_jsonl, "a", [f"first corpus doc {i}" for i in range(7)], llama2_sp)
    b = _tokenize(tmp_path, write_jsonl, "b", [f"second corpus, doc {i}!" for i in range(5)], llama2_sp)
    m = merge.run(merge.Spec(input=[a, b], output_prefix=str(tmp_path / "ab")))
    expected = _docs(a) + _docs(b)
    assert _docs(tmp_path / "ab") == expected
    ref = mc.IndexedDataset(str(tmp_path / "ab"))
    assert [ref[i].tolist() for i in range(len(ref))] == expected
    assert list(ref.document_indices) == list(range(13))
    assert m.summary["documents"] == 12 and m.summary["tokenizer"]["vocab_size"] == 32000
    # the same merge done by megatron-core's own builder gives the same bytes
    builder = mc.IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    builder.add_index(a)
    builder.add_index(b)
    builder.finalize(str(tmp_path / "ref.idx"))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"ref.{ext}").read_bytes() == (tmp_path / f"ab.{ext}").read_bytes()


def test_merge_folder_input(tmp_path, write_jsonl, llama2_sp):
    parts = tmp_path / "parts"
    parts.mkdir()
    for name in ("x", "y"):
        _tokenize(parts, write_jsonl, name, [f"{name} text"], llama2_sp)
    merge.run(merge.Spec(input=[str(parts)], output_prefix=str(tmp_path / "all")))
    assert _docs(tmp_path / "all") == _docs(parts / "x_text_document") + _docs(parts / "y_text_document")


def test_mismatched_tokenizers_refused_before_writing(tmp_path, write_jsonl, llama2_sp):
    tok512 = shared("tiny-llama", "llama2c", "tok512.model")
    a = _tokenize(tmp_path, write_jsonl, "a", ["one story"], llama2_sp)
    b = _tokenize(tmp_path, write_jsonl, "b", ["another story"], tok512)
    with pytest.raises(InputError, match="different tokenizers"):
        merge.run(merge.Spec(input=[a, b], output_prefix=str(tmp_path / "out" / "ab")))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_mismatched_dtypes_refused_before_writing(tmp_path, write_jsonl, llama2_sp):
    a = _tokenize(tmp_path, write_jsonl, "a", ["one story"], llama2_sp)
    with open(tmp_path / "wide.bin", "wb") as f:
        w = IndexedDatasetWriter(f, np.int32)
        w.add_documents(np.array([70000, 3]), [2])
    with open(tmp_path / "wide.idx", "wb") as f:
        w.finish(f)
    with pytest.raises(InputError, match=r"different token dtypes: .*\(uint16\), .*wide \(int32\)"):
        merge.run(merge.Spec(input=[a, str(tmp_path / "wide")], output_prefix=str(tmp_path / "o")))
    assert not list(tmp_path.glob("o*"))
    with pytest.raises(InputError, match="no such file"):
        merge.run(merge.Spec(input=[a, str(tmp_path / "absent")], output_prefix=str(tmp_path / "o")))


def test_corrupt_inputs_refused_before_writing(tmp_path, write_jsonl, llama2_sp):
    """F5: a halved sequence count in a header, or one flipped bit in a dataset that has a
    manifest, fails the merge before anything is written."""
    a = _tokenize(tmp_path, write_jsonl, "a", [f"doc {i}" for i in range(8)], llama2_sp)
    b = _tokenize(tmp_path, write_jsonl, "b", ["one story", "two stories"], llama2_sp)
    idx = tmp_path / "a_text_document.idx"
    original = idx.read_bytes()
    magic, version, code, n_seq, n_doc = HEADER.unpack(original[:HEADER.size])
    idx.write_bytes(HEADER.pack(magic, version, code, n_seq // 2, n_doc) + original[HEADER.size:])
    with pytest.raises(InputError, match=r"a_text_document\.idx: header says 4 sequences, but "
                                         r"the file holds 8"):
        merge.run(merge.Spec(input=[b, a], output_prefix=str(tmp_path / "out" / "ab")))
    assert not (tmp_path / "out").exists()

    idx.write_bytes(original)
    data = bytearray((tmp_path / "a_text_document.bin").read_bytes())
    data[3] ^= 0x04
    (tmp_path / "a_text_document.bin").write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"a_text_document\.bin: checksum mismatch"):
        merge.run(merge.Spec(input=[b, a], output_prefix=str(tmp_path / "out" / "ab")))
    assert not (tmp_path / "out").exists()


def test_an_existing_folder_is_no_output_prefix(tmp_path):
    """Its manifest would be the folder's own (another artifact's, overwritten)."""
    for stage, fields in ((tokenize, {"input": ["x.jsonl"], "tokenizer": "t.model"}),
                          (merge, {"input": ["x"]})):
        with pytest.raises(ValueError, match=f"{tmp_path} is a folder; .* e.g. {tmp_path}/data"):
            stage.Spec(output_prefix=str(tmp_path), **fields)
        assert stage.Spec(output_prefix=str(tmp_path / "data"), **fields)
