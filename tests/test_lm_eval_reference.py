"""lm-evaluation-harness itself, offline, on stories260K over the shared LAMBADA and WikiText-2
(tests/lm_eval_reference.py): its documents, its conventions, and numbers a comparison can use."""

from __future__ import annotations

import math
import re

import pytest

from conftest import shared
from tests.lm_eval_reference import run_lm_eval, wikitext_pages


@pytest.mark.slow
def test_lm_eval_on_stories260k(tmp_path):
    lambada_jsonl = shared("text", "lambada", "lambada_test.jsonl")
    joined = shared("text", "wikitext-2-raw", "wiki.test.joined.txt")
    result = run_lm_eval(shared("tiny-llama", "hf"), lambada_jsonl, joined, tmp_path)
    lambada, wikitext = result["lambada_samples"], result["wikitext_samples"]
    assert len(lambada) == 5153 and len(wikitext) == 62

    # lm-eval scored the very pages wikitext_pages gives: its word and byte counts are theirs
    pages = wikitext_pages(joined)
    assert [(s["words"], s["bytes"]) for s in wikitext] == [
        (len(re.split(r"\s+", p)), len(p.encode("utf-8"))) for p in pages]

    # the aggregates are these per-document numbers under lm-eval's aggregations
    metrics = result["lambada"] | result["wikitext"]
    nll = -sum(s["ll"] for s in wikitext)
    expected = {"acc": sum(s["is_greedy"] for s in lambada) / len(lambada),
                "perplexity": math.exp(-sum(s["ll"] for s in lambada) / len(lambada)),
                "word_perplexity": math.exp(nll / sum(s["words"] for s in wikitext)),
                "byte_perplexity": math.exp(nll / sum(s["bytes"] for s in wikitext)),
                "bits_per_byte": nll / sum(s["bytes"] for s in wikitext) / math.log(2)}
    assert metrics == pytest.approx(expected, rel=1e-9)

    # a 260K-parameter TinyStories model: near-chance LAMBADA, far-out-of-domain WikiText
    assert 0.001 < metrics["acc"] < 0.05
    assert 1e5 < metrics["perplexity"] < 1e9
    assert 1e4 < metrics["word_perplexity"] < 1e8
    assert 5 < metrics["byte_perplexity"] < 40

    # HFLM's conventions our side has to match (see the helper's docstring)
    facts = result["facts"]
    assert facts["lm_eval_version"] == "0.4.13"
    assert facts["add_bos_token"] is None and facts["encode_prepends_bos"]
    assert facts["prefix_token_id"] == facts["bos_token_id"] == 1
    assert facts["max_length"] == 512
