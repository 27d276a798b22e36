"""The synthesize stage with the real stories260K teacher: rows, counts and the tokenize stage
reading the result; a run killed mid-way resumes to the same rows; two ranks (local processes,
and two Slurm nodes) give the same rows as one; the filters on hand-made rows; bad inputs; the
vLLM backend's calls against a stand-in that records them."""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import signal
import sys
import time
import types
from pathlib import Path

import pytest
from conftest import forked_engine, shared

from cluster.submit import submit
from engine.data import synthetic, tokenize
from engine.data.tokenizer import load_tokenizer
from engine.errors import InputError, SpecError
from engine.generate.params import Completion
from engine.manifest import read_manifest
from engine.spec import load_spec
from engine.synthesize import backends
from engine.synthesize.filters import RowFilter, repeated_ngram_ratio
from engine.synthesize.spec import Filters, Spec
from engine.synthesize.stage import run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Two JSONL shards of generated stories (8 documents), plus an empty document and a short
    one in a third file."""
    root = tmp_path_factory.mktemp("synth-corpus")
    synthetic.run(synthetic.Spec(output=str(root), documents=8, shards=2))
    (root / "zz-odd.jsonl").write_text(json.dumps({"text": ""}) + "\n"
                                       + json.dumps({"text": "Tom ran."}) + "\n")
    return root


def _spec(corpus: Path, out: Path, **over) -> Spec:
    fields = {"input": [str(corpus)], "teacher": str(shared("tiny-llama", "hf")),
              "output": str(out), "prefix_tokens": 8, "sampling": {"max_tokens": 12},
              "shard_documents": 2, "progress": False}
    return Spec.model_validate({**fields, **over})


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for part in sorted(out.glob("part-*.jsonl"))
            for line in part.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory) -> Path:
    """An uninterrupted run, one rank, in this process."""
    out = tmp_path_factory.mktemp("synth-straight") / "out"
    run(_spec(corpus, out))
    return out


def test_end_to_end_rows_counts_and_tokenize(corpus, straight, tmp_path):
    manifest = read_manifest(straight)
    s = manifest.summary
    assert (manifest.kind, s["documents"], s["shards"]) == ("corpus", 10, 5)
    assert (s["empty_documents"], s["short_documents"], s["prompts"]) == (1, 1, 8)
    assert s["completions"] == 8 and s["kept"] + sum(s["filtered"].values()) == 8
    rows = _rows(straight)
    assert len(rows) == s["kept"] > 0 and not (straight / "generated").exists()
    tok = load_tokenizer(shared("tiny-llama", "hf"))
    for row in rows:
        assert row["text"] == row["prefix"] + row["completion"]
        assert len(row["prefix_token_ids"]) == 8 and row["prompt_tokens"] == 9  # BOS
        assert tok.decode(row["prefix_token_ids"]) == row["prefix"]
        assert row["teacher"] == manifest.inputs["teacher"]
        assert row["sampling"]["temperature"] == 0.7
        assert row["finish_reason"] in ("stop", "length") and 0 < row["completion_tokens"] <= 12
    # honest throughput: the tokens the rows hold, not prompts × max_tokens
    assert s["kept_tokens"] == sum(r["completion_tokens"] for r in rows) <= s["generated_tokens"]
    assert s["generated_tokens"] < s["completions"] * 12 or s["finish_reasons"] == {"length": 8}
    assert s["throughput"]["tokens_per_second"] > 0 and s["throughput"]["prompts_per_second"] > 0
    table = json.loads((straight / "tables" / "samples.json").read_text())
    assert table["completion"] == [r["completion"] for r in rows][:20]
    # the tokenize stage reads the artifact folder as it is
    done = tokenize.run(tokenize.Spec(input=[str(straight)], output_prefix=str(tmp_path / "d"),
                                      tokenizer=str(shared("tiny-llama", "hf")), progress=False))
    assert done.summary["documents"] == len(rows)


def test_n_completions_per_prompt(corpus, tmp_path):
    spec = _spec(corpus, tmp_path / "out", sampling={"max_tokens": 8, "n": 2},
                 filters={"max_repeated_ngrams": None, "near_duplicates": False})
    s = run(spec).summary
    rows = _rows(tmp_path / "out")
    assert s["completions"] == 16 and s["kept"] == len(rows)
    ids = {r["id"] for r in rows}
    assert len(ids) == len(rows) and {r["sample"] for r in rows} == {0, 1}
    assert all(r["id"] == f"{r['document']}#{r['sample']}" for r in rows)


def test_killed_run_resumes_to_the_same_rows(corpus, straight, tmp_path):
    out = tmp_path / "out"
    spec = tmp_path / "spec.json"
    spec.write_text(_spec(corpus, out, shard_documents=1).model_dump_json())
    proc = forked_engine(["synthesize", "--config", str(spec)])
    try:
        deadline = time.monotonic() + 120
        while not list((out / "generated").glob("shard-*.jsonl")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finished = sorted(p.name for p in (out / "generated").glob("shard-*.jsonl"))
    assert 1 <= len(finished) < 10 and read_manifest(out) is None
    resumed = run(load_spec(Spec, spec))
    assert resumed.summary["shards"] == 10
    # the straight run's shards were of 2 documents: rows do not depend on shards or batches
    assert _rows(out) == _rows(straight)


def test_shards_of_another_generation_are_refused(corpus, tmp_path):
    out = tmp_path / "out"
    (out / "generated").mkdir(parents=True)
    (out / "generated" / "plan.json").write_text('{"fingerprint": "0123456789abcdef00"}')
    with pytest.raises(InputError, match="holds shards of another generation"):
        run(_spec(corpus, out))


def test_two_local_ranks_give_the_rows_of_one(corpus, straight, tmp_path):
    out = tmp_path / "out"
    job = submit("synthesize", _spec(corpus, out), {"tasks_per_node": 2}, "local",
                 run_dir=tmp_path / "run")
    manifest = _wait(job, 150)
    assert manifest.summary["ranks"] == 2 and manifest.summary["shards"] == 5
    assert _rows(out) == _rows(straight)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_slurm_nodes_give_the_rows_of_one(slurm_cluster, corpus, straight, tmp_path):
    out = tmp_path / "out"
    job = submit("synthesize", _spec(corpus, out), {"nodes": 2}, "testcluster",
                 run_dir=tmp_path / "run")
    manifest = _wait(job, 240)
    assert manifest.summary["ranks"] == 2
    assert _rows(out) == _rows(straight)


def _wait(job, timeout_s: float):
    import asyncio

    try:
        return asyncio.run(job.wait(timeout_s, poll_s=0.5))
    except TimeoutError:
        job.cancel()
        raise


# ---------------------------------------------------------------- filters
def _row(i: int, text: str, tokens: int | None = None) -> dict:
    return {"id": str(i), "completion": text,
            "completion_tokens": len(text.split()) if tokens is None else tokens}


STORY = ("the little dog ran to the park and found a red ball under the big tree near the pond "
         "where the ducks swim every morning")


@pytest.mark.parametrize("switch, rows, dropped", [
    ("empty", [_row(0, "  \n")], ["empty"]),
    ("min_tokens", [_row(0, "too short", 2)], ["too_short"]),
    ("max_tokens", [_row(0, STORY, 40)], ["too_long"]),
    ("max_repeated_ngrams", [_row(0, "la la la " * 10)], ["repeated_ngrams"]),
    ("exact_duplicates", [_row(0, STORY), _row(1, STORY)], [None, "exact_duplicate"]),
    ("near_duplicates", [_row(0, STORY), _row(1, STORY.replace("morning", "day"))],
     [None, "near_duplicate"]),
])
def test_each_filter_drops_its_rows_and_can_be_switched_off(switch, rows, dropped):
    on = {"min_tokens": 5, "max_tokens": 30}
    f = RowFilter(Filters(**on))
    assert [f.reason(r) for r in rows] == dropped
    assert sum(f.counts.values()) == len(rows)
    off = {"empty": False, "min_tokens": 0, "max_tokens": None, "max_repeated_ngrams": None,
           "exact_duplicates": False, "near_duplicates": False}
    kept = RowFilter(Filters(**{**on, **{switch: off[switch]}}))
    assert [kept.reason(r) for r in rows][-1] != dropped[-1]


def test_repeated_ngram_ratio():
    assert repeated_ngram_ratio("a b c d", 2) == 0
    assert repeated_ngram_ratio("a b a b a b", 2) == pytest.approx(1 - 2 / 5)
    assert repeated_ngram_ratio("one", 3) == 0


def test_distinct_completions_are_all_kept():
    f = RowFilter(Filters())
    texts = ["the cat sat on the mat and looked at the bird in the sky",
             "a big ship sailed across the sea to find a new island full of gold",
             "she baked a cake for her mother who was very happy that sunny day"]
    assert [f.reason(_row(i, t)) for i, t in enumerate(texts)] == [None] * 3


# ---------------------------------------------------------------- bad input and the spec
def test_empty_documents_only(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": ""}\n{"text": "   "}\n')
    with pytest.raises(InputError, match=r"no document gave a prompt \(2 empty, 0 shorter"):
        run(_spec(tmp_path / "c.jsonl", tmp_path / "out"))


def test_malformed_lines_and_document_ids(tmp_path):
    from engine.synthesize.documents import read_documents

    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "a", "id": 7}\n\n{"text": "b", "id": "x"}\n')
    docs = list(read_documents([good], "text", "id"))
    assert [(d.index, d.id, d.text) for d in docs] == [(0, "7", "a"), (1, "x", "b")]
    assert [d.id for d in read_documents([good], "text", None)] == ["good.jsonl:1", "good.jsonl:3"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: expected a JSON object, got list"):
        list(read_documents([bad], "text", None))
    with pytest.raises(InputError, match=r"bad.jsonl:1: no id in key 'id'"):
        list(read_documents([bad], "text", "id"))


def test_prompt_longer_than_the_teachers_context(corpus, tmp_path):
    with pytest.raises(InputError, match="prefix_tokens 600: prompts of up to 601 tokens leave "
                                         "no room to generate in the teacher's context of 512"):
        run(_spec(corpus, tmp_path / "out", prefix_tokens=600))
    assert not (tmp_path / "out").exists()


def test_teacher_tokenizer_mismatch(corpus, tmp_path, llama2_sp):
    with pytest.raises(InputError, match="the tokenizer has 32000 tokens, the teacher .* embeds "
                                         "512: not the teacher's tokenizer"):
        run(_spec(corpus, tmp_path / "out", tokenizer=str(llama2_sp)))


def test_spec_defaults_checks_and_vllm_missing(tmp_path):
    spec = Spec(input=["c"], teacher="t", output="o", sampling={"max_tokens": 64})
    s = spec.sampling  # a partial override keeps the cookbook's other values
    assert (s.temperature, s.top_p, s.max_tokens, s.repetition_penalty) == (0.7, 0.9, 64, 1.0)
    assert Spec(input=["c"], teacher="t", output="o").sampling.max_tokens == 4096
    with pytest.raises(ValueError, match="set `seed` instead"):
        Spec(input=["c"], teacher="t", output="o", sampling={"seed": 3})
    if backends.importlib.util.find_spec("vllm") is None:
        with pytest.raises(SpecError, match="backend: vllm is not installed here"):
            load_spec(Spec, overrides={"input": ["c"], "teacher": "t", "output": "o",
                                       "backend": "vllm"})


@pytest.fixture
def fake_vllm(monkeypatch) -> dict:
    """vLLM cannot run here (no GPU): a stand-in module that records the calls made to it and
    answers as vLLM's documented API does (RequestOutput, CompletionOutput, Logprob)."""
    calls: dict = {"generate": []}

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class LLM:
        def __init__(self, **kw):
            calls["llm"] = kw

        def generate(self, prompts, sampling_params, use_tqdm):
            calls["generate"].append((prompts, sampling_params, use_tqdm))
            step = types.SimpleNamespace
            return [step(prompt_token_ids=p["prompt_token_ids"], outputs=[step(
                index=0, text=" and then", token_ids=[7, 8], cumulative_logprob=-1.0,
                logprobs=[{7: step(logprob=-0.5)}, {8: step(logprob=-0.25)}],
                finish_reason="length", stop_reason=None)]) for p in prompts]

    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.LLM, module.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    return calls


def test_vllm_backend_calls_the_offline_api(fake_vllm, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")  # the second rank of a node of 4 GPUs: GPUs 2 and 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    teacher = shared("tiny-llama", "hf")
    spec = Spec(input=["c"], teacher=str(teacher), output="o", backend="vllm",
                tensor_parallel_size=2)
    backend = backends.VllmBackend(spec)
    llm = fake_vllm["llm"]
    assert (llm["model"], llm["tokenizer"], llm["tensor_parallel_size"]) == (str(teacher),
                                                                            str(teacher), 2)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    params = spec.sampling.model_copy(update={"seed": 5, "logprobs": True})
    out = backend.generate([[1, 2, 3]], [params], desc="shard 0")
    prompts, sampling, _ = fake_vllm["generate"][0]
    assert prompts == [{"prompt_token_ids": [1, 2, 3]}]
    assert sampling[0].kw["seed"] == 5 and sampling[0].kw["logprobs"] == 0
    assert sampling[0].kw["temperature"] == 0.7 and sampling[0].kw["max_tokens"] == 4096
    assert out == [[Completion([7, 8], " and then", "length", None, [-0.5, -0.25], 3)]]


def test_vllm_backend_refuses_dynamic_ntk(fake_vllm, corpus, tmp_path):
    """vLLM reads positions past max_position_embeddings outside its rotary cache for a dynamic
    NTK export (NaN on the GPU, docs/benchmarks.md): the stage says so before vLLM starts."""
    teacher = tmp_path / "teacher"
    shutil.copytree(shared("tiny-llama", "hf"), teacher)
    config = json.loads((teacher / "config.json").read_text())
    config["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
    (teacher / "config.json").write_text(json.dumps(config))
    spec = _spec(corpus, tmp_path / "out", backend="vllm", teacher=str(teacher))
    with pytest.raises(InputError, match="rope_scaling type dynamic: vLLM does not run"):
        run(spec)
    assert "llm" not in fake_vllm


def test_vllm_stage_end_to_end_never_loads_the_weights(fake_vllm, corpus, monkeypatch, tmp_path):
    from engine.synthesize import stage

    def no_weights(*args, **kwargs):
        raise AssertionError("the vllm backend must not load the teacher into this process")

    monkeypatch.setattr(stage, "load_source", no_weights)
    manifest = run(_spec(corpus, tmp_path / "out", backend="vllm"))
    s = manifest.summary
    assert s["backend"] == "vllm" and s["prompts"] == 8 and s["generated_tokens"] == 16
    # every stand-in completion is the same text: one kept, the others exact duplicates
    assert s["kept"] == 1 and s["filtered"] == {"exact_duplicate": 7}
    assert sum(len(p) for p, _, _ in fake_vllm["generate"]) == 8
    assert _rows(tmp_path / "out")[0]["text"].endswith(" and then")
