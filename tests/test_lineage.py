"""The fingerprint computed before a stage runs is the one its manifest carries, and it follows
content, not paths: the cache of the orchestration layer rests on this."""

from __future__ import annotations

import shutil

from conftest import shared
from engine.registry import get_stage
from engine.spec import load_spec


def _run(stage: str, spec: dict):
    entry = get_stage(stage)
    validated = load_spec(entry.spec, None, spec)
    before, inputs = entry.fingerprint(validated)
    manifest = entry.run(validated)
    assert manifest.fingerprint == before, stage
    assert manifest.inputs == inputs, stage
    return manifest


def test_fingerprint_before_equals_manifest(tmp_path):
    corpus = _run("generate-corpus", {"output": str(tmp_path / "corpus"), "documents": 300})
    tok = _run("train-tokenizer", {"input": [str(tmp_path / "corpus")], "output": str(tmp_path / "tok")})
    assert tok.inputs == {f"input[{i}]": corpus.files[f"stories-00{i}.jsonl"].sha256 for i in range(2)}
    t0 = _run("tokenize", {"input": [str(tmp_path / "corpus" / "stories-000.jsonl")],
                           "output_prefix": str(tmp_path / "a"), "append_eod": True,
                           "tokenizer": str(tmp_path / "tok" / "tokenizer.model"), "progress": False})
    t1 = _run("tokenize", {"input": [str(tmp_path / "corpus" / "stories-001.jsonl")],
                           "output_prefix": str(tmp_path / "b"), "append_eod": True,
                           "tokenizer": str(tmp_path / "tok" / "tokenizer.model"), "progress": False,
                           "workers": 2})
    merged = _run("merge", {"input": [str(tmp_path / "a_text_document"), str(tmp_path / "b_text_document")],
                            "output_prefix": str(tmp_path / "ab")})
    assert merged.inputs == {"input[0]": t0.fingerprint, "input[1]": t1.fingerprint}
    spec = {"model": {"vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1,
                      "num_heads": 2, "num_kv_heads": 2, "max_position_embeddings": 64},
            "data": {"blend": [str(tmp_path / "ab")], "split": "9,1,0", "seq_length": 16},
            "checkpoint": {"save": str(tmp_path / "ckpt")}, "iters": 2, "global_batch_size": 2,
            "precision": "fp32", "device": "cpu"}
    trained = _run("pretrain", spec)
    assert trained.inputs == {"data[0]": merged.fingerprint}
    converted = _run("convert", {"load_dir": str(tmp_path / "ckpt"), "save_dir": str(tmp_path / "hf"),
                                 "source_format": "native", "target_format": "hf",
                                 "tokenizer": str(tmp_path / "tok")})
    assert converted.inputs["source"] == trained.fingerprint


def test_fingerprint_follows_content_not_paths(tmp_path):
    model = shared("tiny-llama", "hf")
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    convert = get_stage("convert")

    def fp(src, **over):
        spec = load_spec(convert.spec, None, {"load_dir": str(src), "save_dir": str(tmp_path / "out"),
                                              "source_format": "hf", "target_format": "native", **over})
        return convert.fingerprint(spec)[0]

    assert fp(model) == fp(copy)
    assert fp(model) != fp(model, tolerance=1e-3)   # a spec field that changes the result
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("1e-05", "2e-05"))
    assert fp(model) != fp(copy)                       # content changed
