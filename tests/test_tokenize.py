"""tokenize: tokens equal the tokenizer's own encoding, output is Megatron's format, bad input
fails clearly and leaves nothing under a final name."""

from __future__ import annotations

import gzip
import hashlib
import json
import signal
import subprocess
import sys
import time

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as RustTokenizer

from conftest import REPO, shared
from engine.data import train_tokenizer
from engine.data.indexed import IndexedDataset
from engine.data.tokenize import Spec, run
from engine.data.tokenizer import SentencePieceTokenizer, load_tokenizer
from engine.errors import InputError, SpecError
from engine.manifest import read_manifest


def _real_paragraphs(limit_chars: int = 400_000) -> list[str]:
    texts = [shared("text", "tinystories", "tinystories_sample.txt").read_text(),
             shared("text", "gutenberg", "pg11.txt").read_text(),
             shared("text", "wikitext-2-raw", "wiki.test.joined.txt").read_text()[:limit_chars]]
    paras = [p for t in texts for p in t.split("\n\n")]
    # whitespace edge cases: leading/trailing/runs of spaces, tabs, newlines, empty pieces
    paras += ["  leading", "trailing  ", "a  b   c", "   ", " ", "x", "\tTab\n new line ",
              "numbers 12345 and 3.14159", "naïve café – “quotes” 日本語 😀"]
    return [p for p in paras if p]


def _cases_from_test_vectors() -> list[str]:
    vec = shared("tokenizers", "llama2", "test_vectors")
    inputs = json.loads((vec / "swift_multilingual_inputs.json").read_text())["inputs"]
    llamacpp = (vec / "llamacpp_llama-spm.inp").read_text().split("\n__ggml_vocab_test__\n")
    return [i["text"] for i in inputs] + [t for t in llamacpp if t]


@pytest.mark.parametrize("model", [("tokenizers", "llama2", "tokenizer.model"),
                                   ("tiny-llama", "llama2c", "tok512.model")])
def test_segment_cache_equals_sentencepiece(model):
    """The cache must be exact: compare with plain SentencePiece on real and adversarial text."""
    path = shared(*model)
    ours = SentencePieceTokenizer(path)
    assert ours.cached, "both models qualify for the exact segment cache"
    sp = spm.SentencePieceProcessor(model_file=str(path))
    texts = _real_paragraphs() + _cases_from_test_vectors()
    got = ours.encode(texts)
    got_again = ours.encode(texts)  # now from a warm cache
    mismatches = [t for t, g, h in zip(texts, got, got_again) if list(g) != sp.encode(t) or g != h]
    assert not mismatches, mismatches[:3]


def test_segments_learned_by_one_process_serve_another(llama2_sp):
    """What one worker's tokenizer learns is enough for another to encode the same text without
    calling SentencePiece, and merging segments it already has changes nothing."""
    sp = spm.SentencePieceProcessor(model_file=str(llama2_sp))
    texts = _real_paragraphs(60_000)
    first, second = SentencePieceTokenizer(llama2_sp), SentencePieceTokenizer(llama2_sp)
    first.encode(texts)
    second.encode(texts[: len(texts) // 2])  # knows part of the segments already
    second.new_segments()
    second.add_segments(first.new_segments())
    assert first.new_segments()[0] == []  # everything was handed out
    assert second.new_segments()[0] == []  # merged segments count as shared

    def no_sentencepiece(*args, **kwargs):
        raise AssertionError("a segment was missing")

    second.sp.encode = no_sentencepiece
    assert second.encode(texts) == [sp.encode(t) for t in texts]


def test_small_blocks_and_long_lines_keep_line_numbers(tmp_path, write_jsonl, llama2_sp):
    """Blocks smaller than a line, a bad line, a last line without a newline: same output and
    line numbers as one big block."""
    rows = [{"text": f"line {i} " + "long words " * (i % 13)} for i in range(40)]
    src = write_jsonl("c.jsonl", rows, raw_lines=[b'{"text": 7}'])
    src.write_bytes(src.read_bytes() + b'{"text": "no newline at the end"}')
    outs = []
    for label, block in (("big", 1 << 20), ("small", 64)):
        m = run(Spec(input=[str(src)], output_prefix=str(tmp_path / label), tokenizer=str(llama2_sp),
                     append_eod=True, batch_bytes=block, batch_lines=3, skip_bad_lines=True,
                     workers=2, progress=False))
        assert m.summary["skipped_examples"] == [f"{src}:41: key 'text' is int, not a string"]
        assert m.summary["documents"] == 41
        outs.append((tmp_path / f"{label}_text_document.bin").read_bytes())
    assert outs[0] == outs[1]


def _read_docs(prefix) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def test_tokens_equal_sentencepiece_plus_eod(tmp_path, write_jsonl, llama2_sp):
    docs = _real_paragraphs(60_000)
    src = write_jsonl("c.jsonl", [{"text": d} for d in docs])
    m = run(Spec(input=[str(src)], output_prefix=str(tmp_path / "out"), tokenizer=str(llama2_sp),
                 append_eod=True, batch_lines=64, progress=False))
    sp = spm.SentencePieceProcessor(model_file=str(llama2_sp))
    expected = [sp.encode(d) + [sp.eos_id()] for d in docs]
    assert _read_docs(tmp_path / "out_text_document") == expected
    assert m.summary["documents"] == len(docs)
    assert m.summary["tokens"] == sum(map(len, expected))
    assert m.summary["tokenizer"]["sha256"] == hashlib.sha256(llama2_sp.read_bytes()).hexdigest()
    assert m.summary["tokenizer"]["eod_id"] == 2 and m.summary["tokenizer"]["vocab_size"] == 32000
    assert m.summary["dtype"] == "uint16"
    for name, entry in m.files.items():
        data = (tmp_path / name).read_bytes()
        assert entry.bytes == len(data) and entry.sha256 == hashlib.sha256(data).hexdigest()
    assert m.inputs["input[0]"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert m.inputs["tokenizer"] == m.summary["tokenizer"]["sha256"]
    assert read_manifest(tmp_path / "out") == m


def test_megatron_core_reads_tokenize_output(tmp_path, write_jsonl, llama2_sp):
    megatron_indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    docs = _real_paragraphs(20_000)
    src = write_jsonl("c.jsonl", [{"text": d} for d in docs])
    run(Spec(input=[str(src)], output_prefix=str(tmp_path / "o"), tokenizer=str(llama2_sp),
             append_eod=True, progress=False))
    ref = megatron_indexed.IndexedDataset(str(tmp_path / "o_text_document"))
    ours = _read_docs(tmp_path / "o_text_document")
    assert [ref[i].tolist() for i in range(len(ref))] == ours


def test_hf_tokenizer_json_and_folder(tmp_path, write_jsonl):
    folder = shared("tokenizers", "llama2")
    docs = _real_paragraphs(20_000)
    src = write_jsonl("c.jsonl", [{"text": d} for d in docs])
    hf = RustTokenizer.from_file(str(folder / "tokenizer.json"))
    expected = [[1] + hf.encode(d, add_special_tokens=False).ids + [2] for d in docs]
    for name, tok in (("file", folder / "tokenizer.json"), ("dir", folder)):
        m = run(Spec(input=[str(src)], output_prefix=str(tmp_path / name), tokenizer=str(tok),
                     add_bos=True, append_eod=True, progress=False))
        assert m.summary["tokenizer"]["kind"] == "hf-tokenizers"
        assert _read_docs(tmp_path / f"{name}_text_document") == expected


def test_keys_gzip_folder_glob_and_worker_determinism(tmp_path, llama2_sp):
    rows = [{"text": f"document {i} " + "word " * (i % 17), "title": f"Title {i}"} for i in range(500)]
    data = tmp_path / "data"
    data.mkdir()
    with gzip.open(data / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[:300])
    (data / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[300:]))
    (data / "notes.txt").write_text("not an input")
    outs = {}
    for label, inputs, workers in (("dir1", [str(data)], 1), ("dir2", [str(data)], 2),
                                   ("glob", [str(data / "*.jsonl*")], 2)):
        m = run(Spec(input=inputs, output_prefix=str(tmp_path / label), tokenizer=str(llama2_sp),
                     json_keys=["text", "title"], append_eod=True, workers=workers, batch_lines=37,
                     progress=False))
        assert m.summary["keys"]["title"]["documents"] == 500
        outs[label] = {k: (tmp_path / f"{label}_{k}_document.bin").read_bytes() +
                       (tmp_path / f"{label}_{k}_document.idx").read_bytes() for k in ("text", "title")}
        assert m.inputs["input[0]"] == \
            hashlib.sha256((data / "a.jsonl.gz").read_bytes()).hexdigest()
    assert outs["dir1"] == outs["dir2"] == outs["glob"]
    sp = spm.SentencePieceProcessor(model_file=str(llama2_sp))
    assert _read_docs(tmp_path / "dir2_title_document") == [sp.encode(r["title"]) + [2] for r in rows]


BAD_LINES = [
    (b'{"text": "ok"', "malformed JSON"),
    (b'{"other": "x"}', "missing key 'text'"),
    (b'{"text": 42}', "key 'text' is int, not a string"),
    (b'{"text": "caf\xe9"}', "invalid UTF-8"),
    (b'["text"]', "expected a JSON object"),
]


@pytest.mark.parametrize("line,reason", BAD_LINES)
def test_bad_line_names_file_and_line(tmp_path, write_jsonl, llama2_sp, line, reason):
    src = write_jsonl("bad.jsonl", [{"text": "fine"}] * 3, raw_lines=[line, b'{"text": "after"}'])
    with pytest.raises(InputError, match=rf"bad\.jsonl:4: {reason}"):
        run(Spec(input=[str(src)], output_prefix=str(tmp_path / "o"), tokenizer=str(llama2_sp),
                 progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # nothing else, not even temps


@pytest.mark.parametrize("line,reason", BAD_LINES)
def test_train_tokenizer_names_file_and_line_as_tokenize_does(tmp_path, write_jsonl, line, reason):
    """One parser for both stages; SentencePiece reads through C++, yet the error stays ours."""
    src = write_jsonl("bad.jsonl", [{"text": "fine"}] * 3, raw_lines=[line, b'{"text": "after"}'])
    with pytest.raises(InputError, match=rf"bad\.jsonl:4: {reason}"):
        train_tokenizer.run(train_tokenizer.Spec(input=[str(src)], output=str(tmp_path / "tok")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_train_tokenizer_vocab_larger_than_the_corpus(tmp_path, write_jsonl):
    src = write_jsonl("small.jsonl", [{"text": "hi"}, {"text": ""}])
    message = r"vocab_size: 512 is more than the corpus \(.*small\.jsonl\) can fill; at most \d+"
    with pytest.raises(SpecError, match=message):
        train_tokenizer.run(train_tokenizer.Spec(input=[str(src)], output=str(tmp_path / "tok")))
    assert not (tmp_path / "tok").exists()


def test_skip_bad_lines_counts_them(tmp_path, write_jsonl, llama2_sp):
    src = write_jsonl("bad.jsonl", [{"text": "one"}, {"text": ""}],
                      raw_lines=[line for line, _ in BAD_LINES] + [b'{"text": "two"}'])
    m = run(Spec(input=[str(src)], output_prefix=str(tmp_path / "o"), tokenizer=str(llama2_sp),
                 skip_bad_lines=True, progress=False))
    assert m.summary["skipped_lines"] == len(BAD_LINES)
    assert m.summary["empty_documents"] == 1
    assert m.summary["documents"] == 2
    assert m.summary["skipped_examples"][0].endswith("bad.jsonl:3: malformed JSON (Expecting ',' delimiter at column 14)")


def test_bad_inputs_fail_before_any_output(tmp_path, write_jsonl, llama2_sp):
    good = write_jsonl("good.jsonl", [{"text": "hello"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    blank = tmp_path / "blank.jsonl"
    blank.write_bytes(b"\n\n")
    notmodel = tmp_path / "fake.model"
    notmodel.write_text("this is not a sentencepiece model")
    cases = [
        ([str(empty)], llama2_sp, r"empty\.jsonl: empty file"),
        ([str(tmp_path / "nope.jsonl")], llama2_sp, r"nope\.jsonl: no such file"),
        ([str(good)], tmp_path / "missing.model", r"tokenizer .*missing\.model: no such file"),
        ([str(good)], notmodel, r"fake\.model: not a SentencePiece model"),
        ([str(good)], tmp_path, r"folder has neither tokenizer\.json nor tokenizer\.model"),
        ([str(blank)], llama2_sp, r"blank\.jsonl: no documents"),
    ]
    for inputs, tok, message in cases:
        with pytest.raises(InputError, match=message):
            run(Spec(input=inputs, output_prefix=str(tmp_path / "out" / "o"), tokenizer=str(tok),
                     progress=False))
        leftovers = list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else []
        assert leftovers == [], (message, leftovers)


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "engine", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@pytest.mark.parametrize("sig,workers", [(signal.SIGINT, 2), (signal.SIGTERM, 1)])
def test_interrupt_leaves_no_files(tmp_path, llama2_sp, sig, workers):
    big = tmp_path / "big.jsonl"
    line = json.dumps({"text": "All work and no play makes Jack a dull boy. " * 40}) + "\n"
    big.write_text(line * 40_000)
    out = tmp_path / "out"
    proc = _cli("tokenize", "--input", str(big), "--output-prefix", str(out / "o"),
                "--tokenizer", str(llama2_sp), "--workers", str(workers), "--no-progress")
    deadline = time.time() + 60
    while not any(out.glob("*.tmp-*")) and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    code, says = (130, "interrupted") if sig == signal.SIGINT else (75, "stopped: SIGTERM received")
    assert proc.returncode == code and says in err, err
    assert not out.exists()  # the folder it created for its output is gone too


def test_cli_config_file_and_errors(tmp_path, write_jsonl, llama2_sp):
    src = write_jsonl("c.jsonl", [{"text": "hello world"}])
    cfg = tmp_path / "spec.yaml"
    cfg.write_text(f"input: [{src}]\noutput_prefix: {tmp_path / 'o'}\ntokenizer: {llama2_sp}\n"
                   "append_eod: true\n")
    proc = _cli("tokenize", "--config", str(cfg), "--no-progress", "--add-bos")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads(out)["summary"]["tokens"] == 4  # BOS, ▁hello, ▁world, EOD
    assert _read_docs(tmp_path / "o_text_document")[0][0] == 1

    cfg.write_text(cfg.read_text() + "workers: 2\nappend_eos: true\n")
    proc = _cli("tokenize", "--config", str(cfg))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert f"{cfg}:6: append_eos: Extra inputs are not permitted" in err

    proc = _cli("tokenize", "--config", str(cfg).replace("spec", "nospec"))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "cannot read spec file" in err

    proc = _cli("tokenize", "--input", str(src), "--output-prefix", str(tmp_path / "p"),
                "--tokenizer-model", str(llama2_sp), "--workers", "zero")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "--workers: Input should be a valid integer" in err


def test_load_tokenizer_identity(llama2_sp):
    tok = load_tokenizer(llama2_sp)
    assert tok.identity()["sha256"] == hashlib.sha256(llama2_sp.read_bytes()).hexdigest()
    assert (tok.bos_id, tok.eod_id, tok.vocab_size) == (1, 2, 32000)
