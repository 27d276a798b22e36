"""The evaluate stage against other people's code and hand-checked cases: perplexity equals
transformers' LlamaForCausalLM over the same windows and reproduces stories260K's published
reference numbers; FinEval accuracies equal a straightforward per-question scorer; the category
mapping, both averages, the strict LAMBADA rule and the word-level WikiText formula are checked
on cases small enough to work out by hand; two data-parallel ranks give one rank's report; bad
inputs name the file and row."""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import engine_ranks, shared
from engine.data.indexed import IndexedDatasetWriter, data_path, index_path
from engine.errors import InputError, SpecError
from engine.evaluate import fineval, fineval_data, lambada, ppl, wikitext
from engine.evaluate.ppl import windows
from engine.evaluate.report import compare_reports
from engine.evaluate.scoring import NLL, SCORED, Request, Scorer
from engine.evaluate.spec import Spec
from engine.evaluate.stage import run
from engine.registry import get_stage
from engine.spec import load_spec

transformers = pytest.importorskip("transformers")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def stories() -> Path:
    return shared("tiny-llama", "hf")


@pytest.fixture(scope="module")
def hf_model(stories):
    return transformers.AutoModelForCausalLM.from_pretrained(stories, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(stories):
    from engine.data.tokenizer import load_tokenizer
    return load_tokenizer(stories)


def evaluate(tmp_path: Path, name: str, **fields) -> tuple[dict, dict]:
    """Run the stage; (report.json, manifest.json)."""
    spec = load_spec(Spec, None, {"output": str(tmp_path / name), "progress": False, **fields})
    manifest = run(spec)
    assert manifest.fingerprint == get_stage("evaluate").fingerprint(spec)[0]
    report = json.loads((tmp_path / name / "report.json").read_text())
    return report, json.loads((tmp_path / name / "manifest.json").read_text())


# ---------------------------------------------------------------- perplexity

def hf_sliding_window_nll(model, ids: list[int], length: int, stride: int) -> tuple[float, int]:
    """The Hugging Face perplexity guide's loop (labels -100 outside the new tokens), windows of
    `length` tokens."""
    x = torch.tensor(ids)[None]
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, x.shape[1], stride):
        end = min(begin + length, x.shape[1])
        target = x[:, begin:end].clone()
        target[:, :-(end - prev_end)] = -100
        with torch.no_grad():
            loss = model(x[:, begin:end], labels=target).loss
        scored = int((target[:, 1:] != -100).sum())
        total, count, prev_end = total + loss.item() * scored, count + scored, end
        if end == x.shape[1]:
            break
    return total, count


def test_windows_score_every_token_once():
    cases = [(1, 8, 4), (2, 8, 4), (8, 8, 3), (9, 8, 8), (10, 8, 8), (100, 16, 5), (17, 16, 1),
             (100, 16, 16)]
    for (n, length, stride), align_last in itertools.product(cases, (False, True)):
        spans = list(windows(n, length, stride, align_last))
        seen = [i for b, e, first in spans for i in range(first, e)]
        assert sorted(seen) == list(range(1, n)), (n, length, stride)
        for b, e, first in spans:  # L positions: L + 1 tokens, >= L - stride + 1 of them context
            assert e - b <= length + 1 and (b == 0 or first - b >= length - stride + 1)
        if align_last and n > length:  # the last window has all L positions
            assert spans[-1][1] - spans[-1][0] == length + 1
    # back to back, one token carried over: lm-eval's rolling windows (L = 4, 11 tokens)
    assert list(windows(11, 4, 4, align_last=True)) == [(0, 5, 1), (4, 9, 5), (6, 11, 9)]
    assert list(windows(11, 4, 4)) == [(0, 5, 1), (4, 9, 5), (8, 11, 9)]


def test_ppl_equals_transformers_and_reference(stories, hf_model, tokenizer, tmp_path):
    story = shared("text", "tinystories", "tinystories_sample.txt")
    parts = [p for p in story.read_text().split("<|endoftext|>") if p.strip()]
    jsonl = tmp_path / "stories.jsonl"
    jsonl.write_text("".join(json.dumps({"text": p}) + "\n" for p in parts))
    indexed = tmp_path / "stories_text_document"  # the same documents, tokenized, no BOS
    tokens = [np.asarray(t, dtype=np.uint16) for t in tokenizer.encode(parts)]
    with open(data_path(indexed), "wb") as bin_, open(index_path(indexed), "wb") as idx:
        writer = IndexedDatasetWriter(bin_, np.uint16)
        writer.add_documents(np.concatenate(tokens), np.array([len(t) for t in tokens]))
        writer.finish(idx)
    settings = ["512:256", "128:96", "1024:384"]  # the last beyond the trained 512 positions
    report, manifest = evaluate(tmp_path, "ppl", load_dir=str(stories),
                                ppl=[str(story), str(jsonl), str(indexed)], windows=settings)
    assert manifest["kind"] == "eval-report"
    assert set(manifest["files"]) == {"report.json", "report.md"}
    records = {(r["dataset"], f"{r['seq_length']}:{r['stride']}"): r for r in report["records"]}
    for window in settings:  # BOS is added to the indexed sequences as to the text
        assert records[(indexed.name, window)]["ppl"] == records[(jsonl.name, window)]["ppl"]
        del records[(indexed.name, window)]
    docs = {story.name: [story.read_text()], jsonl.name: parts}
    for (name, window), rec in records.items():
        length, stride = map(int, window.split(":"))
        total, count = 0.0, 0
        for text in docs[name]:
            ids = [tokenizer.bos_id] + list(tokenizer.encode([text])[0])
            t, c = hf_sliding_window_nll(hf_model, ids, length + 1, stride)  # L + 1 tokens
            total, count = total + t, count + c
            assert c == len(ids) - 1
        assert rec["tokens"] == count, (name, window)
        assert math.isclose(rec["ppl"], math.exp(total / count), rel_tol=1e-3), (name, window)
    metric = report["metrics"][f"ppl/{story.name}/512:256/ppl"]
    assert metric == records[(story.name, "512:256")]["ppl"]
    assert "## Perplexity" in (tmp_path / "ppl" / "report.md").read_text()

    # reference_outputs.json: BOS + 511-token chunks, mean NLL over the first 20000 tokens
    reference = json.loads(shared("tiny-llama", "reference_outputs.json").read_text())
    expected = reference["perplexity_hf_fp32"]
    scorer = Scorer(engine_model(stories), CPU, progress=False)
    for rel, key in [(("text", "tinystories", "tinystories_sample.txt"), "(all, 1882 tokens)"),
                     (("text", "wikitext-2-raw", "wiki.test.joined.txt"), "(first 20000 tokens)")]:
        ids = list(tokenizer.encode([shared(*rel).read_text()[:200_000]])[0])[:20000]
        chunks = [Request(np.array([tokenizer.bos_id] + ids[i:i + 511]), 1)
                  for i in range(0, len(ids), 511)]
        res = scorer.score(chunks)
        ppl = math.exp(res[:, NLL].sum() / res[:, SCORED].sum())
        assert math.isclose(ppl, expected[f"{'/'.join(rel)} {key}"], rel_tol=2e-4), rel


def engine_model(folder: Path):
    from engine.convert.hf import load_hf
    return load_hf(folder)[2]


# ---------------------------------------------------------------- FinEval

def straightforward_fineval(model, tokenizer, folder: Path, subject: str, shots: int, limit: int,
                           method: str) -> tuple[np.ndarray, np.ndarray]:
    """FinEval's evaluator, question by question: (predictions, answers)."""
    def rows(split):
        with open(folder / split / f"{subject}_{split}.csv", encoding="utf-8-sig", newline="") as f:
            return list(csv.DictReader(f))

    def example(r, with_answer):
        text = r["question"] + "".join(f"\n{c}. {r[c]}" for c in "ABCD") + "\n答案："
        return text + r["answer"].strip() + "\n\n" if with_answer else text

    def encode(text):
        return list(tokenizer.encode([text])[0])

    history = "".join(example(r, True) for r in rows("dev")[:shots])
    if shots:
        history = f"以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n" + history
    letter_a = [encode(c)[0] for c in "ABCD"]
    letter_b = [encode("：" + c)[-1] for c in "ABCD"]
    predictions, truth = [], []
    for r in rows("val")[:limit]:
        context = [tokenizer.bos_id] + encode(history + example(r, False))
        if method == "answer":
            with torch.no_grad():
                logits = model(torch.tensor(context)[None])[0, -1]
            scores = [logits[a] + logits[b] for a, b in zip(letter_a, letter_b)]
        else:  # the option's tokens: those after the question's own tokens in question + option
            scores = []
            for c in "ABCD":
                own, full = encode(example(r, False)), encode(example(r, False) + r[c])
                same = next((i for i, (x, y) in enumerate(zip(own, full)) if x != y), len(own))
                continuation = full[same:]
                with torch.no_grad():
                    logp = model(torch.tensor(context + continuation)[None])[0].log_softmax(-1)
                scores.append(sum(logp[len(context) - 1 + i, t].item()
                                  for i, t in enumerate(continuation)))
        predictions.append(int(np.argmax(scores)))
        truth.append("ABCD".index(r["answer"].strip()))
    return np.array(predictions), np.array(truth)


def test_fineval_equals_straightforward_scorer(stories, tokenizer):
    folder = shared("fineval", "academic")
    limit = 4
    data = fineval_data.load(folder, "val", ["finance", "microeconomics"], None, 5, limit)
    model = engine_model(stories)
    scorer = Scorer(model, CPU, progress=False)
    # the option method zero-shot only: 4 long forwards a question in the loop below
    for method, shots in (("answer", [0, 5]), ("option", [0])):
        result = fineval.evaluate(scorer, data, fineval.Template(), tokenizer, tokenizer.bos_id,
                                  2048, shots, [method])
        ours = result.predictions(method)
        for ki, k in enumerate(shots):
            expected, truth = zip(*(straightforward_fineval(model, tokenizer, folder, s.name, k,
                                                            limit, method)
                                    for s in data.subjects))
            assert ours[:, ki].tolist() == np.concatenate(expected).tolist(), (method, k)
            correct = sum(int((p == t).sum()) for p, t in zip(expected, truth))
            overall = next(r for r in result.records if r["level"] == "overall"
                           and r["method"] == method and r["shots"] == k)
            assert overall["correct"] == correct and overall["prompts_truncated"] == 0


class ConstantModel(torch.nn.Module):
    """Logits that never depend on the input."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("vector", logits.float())

    def forward_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, 1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.vector.expand(hidden.shape[0], -1)


def write_fineval(folder: Path, split: str, subject: str, answers: str, bom=False, crlf=True):
    (folder / split).mkdir(parents=True, exist_ok=True)
    end = "\r\n" if crlf else "\n"
    lines = ["id,question,A,B,C,D,answer"] + [
        f'{i},"问题{i}, 第{subject}题",甲,乙,丙,丁,{a}' for i, a in enumerate(answers)]
    (folder / split / f"{subject}_{split}.csv").write_bytes(
        ("\ufeff" if bom else "").encode() + end.join(lines).encode() + end.encode())


def test_fineval_categories_and_averages_by_hand(tokenizer, tmp_path):
    folder = tmp_path / "fineval"
    # finance and insurance are Finance, statistics is Economy (FinEval's mapping, shipped copy)
    write_fineval(folder, "val", "finance", ["B", "B", "A", "C"], bom=True)   # 2/4
    write_fineval(folder, "val", "insurance", ["B", "B", "D "])               # 2/3 ("D " = D)
    write_fineval(folder, "val", "statistics", ["A", "C"], crlf=False)        # 0/2
    for s in ("finance", "insurance", "statistics"):
        write_fineval(folder, "dev", s, ["A", "B"])
    logits = torch.zeros(tokenizer.vocab_size)
    logits[list(tokenizer.encode(["：B"])[0])[-1]] = 5.0  # always answers B
    data = fineval_data.load(folder, "val", None, None, 2, None)
    scorer = Scorer(ConstantModel(logits), CPU, progress=False)
    result = fineval.evaluate(scorer, data, fineval.Template(), tokenizer, tokenizer.bos_id, 4096,
                              [0, 2], ["answer"])
    assert (result.predictions("answer") == 1).all()
    got = {(r["shots"], r["level"], r["name"]): r for r in result.records}
    for k in (0, 2):
        assert got[(k, "subject", "finance")]["accuracy"] == 0.5
        assert got[(k, "subject", "insurance")]["category"] == "Finance"
        assert got[(k, "category", "Finance")]["accuracy"] == 4 / 7
        assert got[(k, "category", "Finance")]["accuracy_subject_avg"] == (1 / 2 + 2 / 3) / 2
        assert got[(k, "category", "Economy")]["accuracy"] == 0.0
        assert got[(k, "overall", "all")]["accuracy"] == 4 / 9
        assert got[(k, "overall", "all")]["accuracy_subject_avg"] == (1 / 2 + 2 / 3 + 0) / 3


def test_fineval_prompts_drop_earliest_shots_then_cut(tokenizer, tmp_path):
    folder = tmp_path / "fineval"
    write_fineval(folder, "val", "finance", ["A"])
    write_fineval(folder, "dev", "finance", ["A", "B", "C"])
    data = fineval_data.load(folder, "val", None, None, 3, None)
    template = fineval.Template()
    subject, q, dev = data.subjects[0], data.questions["finance"][0], data.shots["finance"]
    encode = lambda text: [tokenizer.bos_id] + list(tokenizer.encode([text])[0])  # noqa: E731
    zero_shot = q.question + "\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案："  # no header: FinEval's
    assert encode(template.prompt(subject, [], q, few_shot=False)) == encode(zero_shot)
    two_shots = encode(template.prompt(subject, dev[1:], q, few_shot=True))
    prompts = fineval.Prompts(data, template, tokenizer, tokenizer.bos_id, len(two_shots))
    fitted = prompts.fit(q, 3)
    assert fitted.tokens == two_shots and fitted.shots_dropped == 1 and fitted.tokens_cut == 0
    prompts.max_length = 20
    fitted = prompts.fit(q, 3)
    only_question = encode(template.prompt(subject, [], q, few_shot=True))
    assert fitted.shots_dropped == 3 and fitted.tokens_cut == len(only_question) - 20
    assert fitted.tokens == [tokenizer.bos_id] + only_question[-19:]  # BOS kept, the end kept


# ---------------------------------------------------------------- LAMBADA

class BigramModel(torch.nn.Module):
    """logits(next | current token) = table[current token]."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)

    def forward_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(ids, self.table.shape[0]).float()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.table


def test_lambada_greedy_and_strict_by_hand(tokenizer, tmp_path):
    text = "the dog ran to the red bus"
    data = tmp_path / "lambada.jsonl"
    data.write_text(json.dumps({"text": text}) + "\n")
    whole = [tokenizer.bos_id] + list(tokenizer.encode([text])[0])
    context = [tokenizer.bos_id] + list(tokenizer.encode(["the dog ran to the red"])[0])
    target = whole[len(context):]
    assert whole[:len(context)] == context and len(target) >= 1
    after = {".": list(tokenizer.encode(["bus."])[0])[-1],
             "s": list(tokenizer.encode(["buss"])[0])[-1]}

    def accuracies(chain: list[int], convention: str = "lm-eval") -> tuple[float, float]:
        table = torch.zeros(tokenizer.vocab_size, tokenizer.vocab_size)
        for current, nxt in zip([context[-1]] + target, chain):
            table[current, nxt] = 10.0
        scorer = Scorer(BigramModel(table), CPU, progress=False)
        (record,) = lambada.evaluate(scorer, str(data), tokenizer, tokenizer.bos_id, 64, "text",
                                     None, convention)
        return record["accuracy"], record["accuracy_strict"]

    for convention in ("lm-eval", "whole-word"):  # the same tokens for a space before the word
        assert accuracies(target + [after["."]], convention) == (1.0, 1.0)  # word, punctuation
    assert accuracies(target + [tokenizer.eod_id]) == (1.0, 1.0)  # the word, then end of text
    assert accuracies(target + [after["s"]]) == (1.0, 0.0)        # "buss": greedy, not strict
    wrong_first = (target[0] + 1) % tokenizer.vocab_size
    assert accuracies([wrong_first] + target[1:] + [after["."]]) == (0.0, 0.0)
    assert lambada.continues_word(tokenizer, target, after["s"])
    assert not lambada.continues_word(tokenizer, target, list(tokenizer.encode([" and"])[0])[0])


def test_lambada_conventions_split_the_word(tokenizer):
    def encode(text: str) -> list[int]:
        return list(tokenizer.encode([text])[0])

    bos, newline = [tokenizer.bos_id], encode("\n")[-1]
    texts = ["he said.\n\nhello", "two  spaces"]
    pairs = {convention: lambada.encode_pairs(texts, convention, tokenizer, tokenizer.bos_id)
             for convention in lambada.SPLITS}
    # lm-eval splits at the last " ": "said.", the blank line and "hello" are all the target
    (context, target), (context2, target2) = pairs["lm-eval"]
    assert context == bos + encode("he") and target.count(newline) == 2
    # ... and the context's trailing space moves to the target
    assert context2 == bos + encode("two") and target2 == encode("two  spaces")[len(context2) - 1:]
    # whole-word: the whitespace run stays in the context, no newline is scored
    (context, target), (_, target2) = pairs["whole-word"]
    assert context + target == bos + encode(texts[0]) and newline not in target
    assert tokenizer.decode(target) == "hello" and tokenizer.decode(target2) == "spaces"
    # megatron: the stripped context and " " + word, each encoded alone
    (context, target), _ = pairs["megatron"]
    assert context == bos + encode("he said.") and target == encode(" hello")


def test_lambada_end_to_end(stories, tmp_path):
    data = str(shared("text", "lambada", "lambada_test.jsonl"))
    records = {}
    for convention in ("lm-eval", "whole-word"):
        report, _ = evaluate(tmp_path, convention, load_dir=str(stories), lambada=data, limit=50,
                             lambada_convention=convention)
        (records[convention],) = report["records"]
        assert f"lambada/{convention}/accuracy_strict" in report["metrics"]
    for record in records.values():
        assert record["examples"] == 50 and record["target_tokens"] >= 50
        assert 0 <= record["accuracy_strict"] <= record["accuracy"] <= 1
        assert math.isfinite(record["ppl_word"]) and math.isfinite(record["ppl_token"])
    # a space that stories260K's tokenizer writes as a token of its own ("▁" + "Queen" pieces)
    # is part of lm-eval's target, and context in whole-word
    assert records["whole-word"]["target_tokens"] < records["lm-eval"]["target_tokens"]


# ---------------------------------------------------------------- WikiText

class UniformModel(ConstantModel):
    def __init__(self, vocab: int):
        super().__init__(torch.zeros(vocab))


def test_wikitext_conventions_by_hand(tokenizer, tmp_path):
    assert wikitext.detokenize("a @-@ b @,@ c , d ( e ) = = f = = \n") == "a-b,c, d (e) == f ==\n"
    text = (" \n = Title = \n \n a b c @-@ d . \n \n = = Part = = \n \n e f \n \n"
            " = Other = \n \n g h \n")
    pages = [" = Title = \n \n a b c @-@ d . \n \n = = Part = = \n \n e f \n ",
             " = Other = \n \n g h \n"]
    assert wikitext.articles(text) == pages  # a section title does not start an article
    path = tmp_path / "wiki.test.raw"
    path.write_text(text)

    def encoded(texts: list[str]) -> int:
        return sum(len(ids) for ids in tokenizer.encode([wikitext.detokenize(t) for t in texts]))

    scorer = Scorer(UniformModel(tokenizer.vocab_size), CPU, progress=False)
    expected = {  # convention: (tokens scored, words, bytes)
        "lm-eval": (encoded(pages) + len(pages),  # each article's BOS is predicted too
                    sum(len(re.split(r"\s+", p)) for p in pages), sum(map(len, pages))),
        "megatron": (encoded([text]), len(text.strip().split(" ")) - 1, len(text))}
    for convention, (tokens, words, n_bytes) in expected.items():
        records = wikitext.evaluate(scorer, str(path), tokenizer, tokenizer.bos_id,
                                    [(8, 3), (8, 8)], True, convention)
        for record in records:
            assert (record["tokens"], record["words"], record["bytes"]) == (tokens, words, n_bytes)
            # every token costs ln V nats: word ppl = V ** (tokens / words), and so on
            v = tokenizer.vocab_size
            assert record["word_ppl"] == pytest.approx(v ** (tokens / words), rel=1e-6)
            assert record["byte_ppl"] == pytest.approx(v ** (tokens / n_bytes), rel=1e-6)
            assert record["bits_per_byte"] == pytest.approx(tokens * math.log2(v) / n_bytes)
            assert record["token_ppl"] == pytest.approx(v, rel=1e-6)
        assert records[0]["windows"] > records[1]["windows"]  # stride 3 vs back to back


# ---------------------------------------------------------------- per-document numbers

def test_per_document_rows_by_hand(tokenizer, tmp_path):
    """A uniform model: every scored token costs ln V, so a document's log-probability is
    -(its scored tokens) · ln V; a suite's rows add up to its record."""
    scorer = Scorer(UniformModel(tokenizer.vocab_size), CPU, progress=False)
    texts = ["the dog ran to the red bus", "a cat sat", "one two three four five six seven"]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    release = tmp_path / "wiki.test.raw"
    release.write_text(" = Title = \n \n a b c @-@ d . \n = Other = \n \n g h \n")
    rows: list[dict] = []
    docs = ppl.load_documents(str(data), lambda: tokenizer, "text", tokenizer.bos_id,
                              tokenizer.vocab_size, None)
    (ppl_record,) = ppl.evaluate(scorer, [docs], [(4, 2)], rows)
    (wiki_record,) = wikitext.evaluate(scorer, str(release), tokenizer, tokenizer.bos_id,
                                       [(8, 8)], True, "lm-eval", per_document=rows)
    (lambada_record,) = lambada.evaluate(scorer, str(data), tokenizer, tokenizer.bos_id, 64,
                                         "text", None, "lm-eval", rows)
    suites = {name: [r for r in rows if r["suite"] == name]
              for name in ("ppl", "wikitext", "lambada")}
    assert [len(v) for v in suites.values()] == [3, 2, 3] and len(rows) == 8
    assert [r["tokens"] for r in suites["ppl"]] == [len(ids) for ids in tokenizer.encode(texts)]
    assert suites["ppl"][0]["window"] == "4:2" and suites["wikitext"][1]["document"] == 1
    for row in rows:
        assert row["log_prob"] == pytest.approx(-row["tokens"] * math.log(tokenizer.vocab_size))
    for name, record, tokens in [("ppl", ppl_record, "tokens"), ("wikitext", wiki_record, "tokens"),
                                 ("lambada", lambada_record, "target_tokens")]:
        assert -sum(r["log_prob"] for r in suites[name]) == pytest.approx(record["nll_sum"])
        assert sum(r["tokens"] for r in suites[name]) == record[tokens]
    assert sum(r["greedy"] for r in suites["lambada"]) == lambada_record["correct"]
    assert sum(r["strict"] for r in suites["lambada"]) == lambada_record["correct_strict"]


def test_per_document_option_writes_documents_jsonl(stories, tmp_path):
    from engine.__main__ import main

    data = str(shared("text", "lambada", "lambada_test.jsonl"))
    out = tmp_path / "with"
    assert main(["evaluate", "--load-dir", str(stories), "--output", str(out), "--lambada", data,
                 "--limit", "5", "--no-progress", "--per-document"]) == 0
    rows = [json.loads(line) for line in (out / "documents.jsonl").read_text().splitlines()]
    (record,) = json.loads((out / "report.json").read_text())["records"]
    assert [r["document"] for r in rows] == list(range(5))
    assert -sum(r["log_prob"] for r in rows) == pytest.approx(record["nll_sum"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert "documents.jsonl" in manifest["files"] and manifest["spec"]["per_document"]
    report, plain = evaluate(tmp_path, "without", load_dir=str(stories), lambada=data, limit=5)
    assert report["records"] == [record] and "documents.jsonl" not in plain["files"]
    assert not (tmp_path / "without" / "documents.jsonl").exists()
    assert plain["fingerprint"] != manifest["fingerprint"]  # another artifact: other files


# ---------------------------------------------------------------- reports, ranks, bad input

def test_two_ranks_give_one_ranks_report(stories, tmp_path):
    spec = {"load_dir": str(stories), "progress": False, "limit": 4, "windows": ["256:128"],
            "ppl": [str(shared("text", "tinystories", "tinystories_sample.txt"))],
            "lambada": str(shared("text", "lambada", "lambada_test.jsonl")),
            "fineval": str(shared("fineval", "academic")), "fineval_subjects": ["finance"],
            "fineval_shots": [0]}
    one, _ = evaluate(tmp_path, "one", **spec)
    config = tmp_path / "two.json"
    config.write_text(json.dumps({**spec, "output": str(tmp_path / "two")}))
    engine_ranks(["evaluate", "--config", str(config)], ranks=2)
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["settings"]["world_size"] == 2
    assert one["metrics"].keys() == two["metrics"].keys()
    for name, value in one["metrics"].items():  # other batches, other fp32 rounding: ppl = exp(.)
        assert math.isclose(value, two["metrics"][name], rel_tol=1e-5), name
    table = compare_reports([tmp_path / "one", tmp_path / "two" / "report.json"])
    assert table.splitlines()[0].startswith("| metric |") and "lambada/lm-eval/accuracy" in table


def test_bad_inputs_name_file_and_row(tmp_path):
    folder = tmp_path / "fineval"
    write_fineval(folder, "val", "finance", ["A", "E"])
    with pytest.raises(InputError, match=r"finance_val\.csv:3: row 2 \(id 1\): answer 'E'"):
        fineval_data.load(folder, "val", None, None, 0, None)
    (folder / "val" / "finance_val.csv").write_text("id,question,A,B,C,D\n0,q,a,b,c,d\n")
    with pytest.raises(InputError, match=r"finance_val\.csv:1: missing column\(s\) answer"):
        fineval_data.load(folder, "val", None, None, 0, None)
    latin1 = "id,question,A,B,C,D,answer\n0,\xe9\n".encode("latin-1")
    (folder / "val" / "finance_val.csv").write_bytes(latin1)
    with pytest.raises(InputError, match=r"finance_val\.csv:2: not UTF-8"):
        fineval_data.load(folder, "val", None, None, 0, None)
    with pytest.raises(SpecError, match=r"window '128:256': stride 256 must be between 1 and the"):
        load_spec(Spec, None, {"load_dir": "m", "output": "o", "ppl": ["x"],
                               "windows": ["128:256"]})
    with pytest.raises(SpecError, match="no suite chosen"):
        load_spec(Spec, None, {"load_dir": "m", "output": "o"})
    with pytest.raises(SpecError, match="unknown placeholder"):
        load_spec(Spec, None, {"load_dir": "m", "output": "o", "lambada": "x",
                               "fineval_question": "{question} {answer}"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    with pytest.raises(InputError, match=r"bad\.jsonl:2: no string field 'text'"):
        lambada.evaluate(None, str(bad), None, None, 8, "text", None, "lm-eval")


def test_native_checkpoint_root_and_iteration(stories, tmp_path):
    from engine.convert.native import write_native
    from engine.formats import TOKENIZER_DIR
    native = tmp_path / "native"
    model = engine_model(stories)
    write_native(native, model, model.cfg, {})
    (native / TOKENIZER_DIR).mkdir()
    shutil.copy(stories / "tokenizer.json", native / TOKENIZER_DIR)
    story = str(shared("text", "tinystories", "tinystories_sample.txt"))
    reports = [evaluate(tmp_path, name, load_dir=str(path), ppl=[story], windows=["256:128"])[0]
               for name, path in [("from-hf", stories), ("from-root", native),
                                  ("from-iter", native / "iter_0000000")]]
    assert [r["model"]["format"] for r in reports] == ["hf", "native", "native"]
    assert reports[2]["model"]["name"] == "native/iter_0000000"
    for r in reports[1:]:  # the tokenizer came along into <root>/tokenizer/
        assert r["metrics"] == pytest.approx(reports[0]["metrics"], rel=1e-6)


def test_jsonl_lines_end_at_newline_only(tmp_path):
    """U+2028 and U+0085 are valid raw inside a JSON string: they must not split a line."""
    from engine.evaluate.inputs import read_jsonl

    path = tmp_path / "odd.jsonl"
    texts = ["one\u2028two", "three\u0085four\x1cfive", "six"]
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\r\n" for t in texts),
                    encoding="utf-8")
    assert read_jsonl(path, "text") == texts
