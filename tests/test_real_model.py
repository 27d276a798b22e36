"""The real trained stories260K model through the engine: HF -> native, then a few finetune steps
on real TinyStories text lower its validation loss on a held-out story."""

from __future__ import annotations

import json

from conftest import shared
from engine.registry import get_stage
from engine.spec import load_spec


def _run(stage: str, spec: dict):
    entry = get_stage(stage)
    return entry.run(load_spec(entry.spec, None, spec))


def test_finetune_stories260k_lowers_validation_loss(tmp_path):
    hf = shared("tiny-llama", "hf")
    text = shared("text", "tinystories", "tinystories_sample.txt").read_text(encoding="utf-8")
    stories = [s.strip() for s in text.split("<|endoftext|>") if s.strip()]
    assert len(stories) >= 4
    # the held-out story goes last: a "n-1,1,0" split puts it alone in the validation range
    (tmp_path / "stories.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in stories))
    _run("tokenize", {"input": [str(tmp_path / "stories.jsonl")], "output_prefix": str(tmp_path / "ts"),
                      "tokenizer": str(hf / "tokenizer.model"), "append_eod": True, "add_bos": True,
                      "progress": False})
    native = _run("convert", {"load_dir": str(hf), "save_dir": str(tmp_path / "native"),
                              "source_format": "hf", "target_format": "native"})
    assert native.summary["verification"]["max_abs_diff"] < 1e-4
    spec = {"load": str(tmp_path / "native"),
            "data": {"blend": [str(tmp_path / "ts_text_document")], "split": f"{len(stories) - 1},1,0",
                     "seq_length": 128},
            "checkpoint": {"save": str(tmp_path / "tuned")}, "eval": {"interval": 10, "iters": 1,
                                                                      "initial": True},
            "iters": 10, "micro_batch_size": 4, "global_batch_size": 4, "precision": "fp32",
            "optim": {"lr": 1e-4, "warmup_iters": 0, "min_lr": 0.0, "weight_decay": 0.0},
            "device": "cpu", "log_interval": 1}
    manifest = _run("finetune", spec)
    valid = {}
    for line in (tmp_path / "tuned" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "metrics" and "valid_loss" in rec["data"]:
            valid[rec["step"]] = rec["data"]["valid_loss"]
    assert set(valid) == {0, 10}
    # the trained model starts near its reported in-domain quality (PPL ~6 on this text)
    assert 1.0 < valid[0] < 2.5
    assert valid[10] < valid[0], valid  # measured: 1.3008 -> 1.2978 (deterministic: fp32, seeded)
    assert manifest.summary["iterations"] == 10
