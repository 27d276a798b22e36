"""lm-evaluation-harness itself, offline, on stories260K over the shared LAMBADA and WikiText-2
(tests/lm_eval_reference.py): its documents, its conventions, and our evaluate stage's `lm-eval`
convention against it, aggregate and per document."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from conftest import shared
from engine.evaluate.spec import Spec
from engine.evaluate.stage import run
from engine.spec import load_spec
from tests.lm_eval_reference import release_text, run_lm_eval, wikitext_pages

AGREE = 1e-4  # relative: the bar; seen: 2e-8 aggregate, float32 batching per document


@pytest.fixture(scope="module")
def data() -> dict:
    return {"lambada": shared("text", "lambada", "lambada_test.jsonl"),
            "joined": shared("text", "wikitext-2-raw", "wiki.test.joined.txt"),
            "model": shared("tiny-llama", "hf")}


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> dict:
    return run_lm_eval(data["model"], data["lambada"], data["joined"],
                       tmp_path_factory.mktemp("lm-eval"))


@pytest.mark.slow
def test_lm_eval_on_stories260k(data, reference):
    lambada_samples, wikitext_samples = reference["lambada_samples"], reference["wikitext_samples"]
    assert len(lambada_samples) == 5153 and len(wikitext_samples) == 62

    # lm-eval scored the very pages wikitext_pages gives: its word and byte counts are theirs
    pages = wikitext_pages(data["joined"])
    assert [(s["words"], s["bytes"]) for s in wikitext_samples] == [
        (len(re.split(r"\s+", p)), len(p.encode("utf-8"))) for p in pages]

    # the aggregates are these per-document numbers under lm-eval's aggregations
    metrics = reference["lambada"] | reference["wikitext"]
    nll = -sum(s["ll"] for s in wikitext_samples)
    n_bytes = sum(s["bytes"] for s in wikitext_samples)
    expected = {"acc": sum(s["is_greedy"] for s in lambada_samples) / len(lambada_samples),
                "perplexity": math.exp(-sum(s["ll"] for s in lambada_samples)
                                       / len(lambada_samples)),
                "word_perplexity": math.exp(nll / sum(s["words"] for s in wikitext_samples)),
                "byte_perplexity": math.exp(nll / n_bytes),
                "bits_per_byte": nll / n_bytes / math.log(2)}
    assert metrics == pytest.approx(expected, rel=1e-9)

    # a 260K-parameter TinyStories model: near-chance LAMBADA, far-out-of-domain WikiText
    assert 0.001 < metrics["acc"] < 0.05
    assert 1e5 < metrics["perplexity"] < 1e9
    assert 1e4 < metrics["word_perplexity"] < 1e8
    assert 5 < metrics["byte_perplexity"] < 40

    # HFLM's conventions our side has to match (see the helper's docstring)
    facts = reference["facts"]
    assert facts["lm_eval_version"] == "0.4.13"
    assert facts["add_bos_token"] is None and facts["encode_prepends_bos"]
    assert facts["prefix_token_id"] == facts["bos_token_id"] == 1
    assert facts["max_length"] == 512


@pytest.mark.slow
def test_our_lm_eval_convention_agrees_with_lm_eval(data, reference, tmp_path):
    release = tmp_path / "wiki.test.raw"
    release.write_text(release_text(data["joined"]), encoding="utf-8")

    # the stage as users run it: report metrics against lm-eval's
    spec = load_spec(Spec, None, {"load_dir": str(data["model"]), "output": str(tmp_path / "r"),
                                  "wikitext": str(release), "lambada": str(data["lambada"]),
                                  "progress": False, "per_document": True})
    run(spec)
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    ours = report["metrics"]
    assert {"word_perplexity": ours["wikitext/lm-eval/512:512/word_ppl"],
            "byte_perplexity": ours["wikitext/lm-eval/512:512/byte_ppl"],
            "bits_per_byte": ours["wikitext/lm-eval/512:512/bits_per_byte"],
            "acc": ours["lambada/lm-eval/accuracy"],
            "perplexity": ours["lambada/lm-eval/ppl_word"]} == pytest.approx(
        reference["wikitext"] | reference["lambada"], rel=AGREE)
    (record,) = [r for r in report["records"] if r["suite"] == "wikitext"]
    assert record["documents"] == 62 and record["convention"] == "lm-eval"

    # ... and document by document, from the same run's documents.jsonl
    rows = [json.loads(line)
            for line in (tmp_path / "r" / "documents.jsonl").read_text().splitlines()]
    ours_lambada = [r for r in rows if r["suite"] == "lambada"]
    samples = reference["lambada_samples"]
    (lambada_record,) = [r for r in report["records"] if r["suite"] == "lambada"]
    assert lambada_record["contexts_cut"] == 0
    assert [r["document"] for r in ours_lambada] == list(range(len(samples)))
    np.testing.assert_allclose([r["log_prob"] for r in ours_lambada], [s["ll"] for s in samples],
                               rtol=AGREE)
    assert [r["greedy"] for r in ours_lambada] == [bool(s["is_greedy"]) for s in samples]

    ours_wikitext = [r for r in rows if r["suite"] == "wikitext"]
    assert [(r["window"], r["document"]) for r in ours_wikitext] == [
        ("512:512", i) for i in range(62)]
    np.testing.assert_allclose([r["log_prob"] for r in ours_wikitext],
                               [s["ll"] for s in reference["wikitext_samples"]], rtol=AGREE)
