r"""EleutherAI's lm-evaluation-harness itself, run offline, as the reference for our evaluate
stage's `lm-eval` convention (issue 19 item 6).

`run_lm_eval` runs lm-eval's own `lambada_openai` and `wikitext` tasks on a local Hugging Face
model folder and returns lm-eval's aggregate metrics, its per-document log-likelihoods and the
tokenization facts its HF model (HFLM) applied. The task YAML files are lm-eval's own, included
unchanged (same doc_to_text/doc_to_target, same `wikitext_detokenizer` and `process_results`):
only the data source is replaced by local JSON Lines. `wikitext_pages` returns the very
documents lm-eval scores, for our engine's side of the comparison.

Data (../shared/data/text, see its README):

* LAMBADA: `lambada/lambada_test.jsonl` is read as it is (its CRLF line ends are JSON
  whitespace). lm-eval reads `EleutherAI/lambada_openai` (`default`), the same OpenAI file; that
  the two are byte-identical could not be checked offline (the row count, 5,153, matches).
* WikiText-2: lm-eval reads `EleutherAI/wikitext_document_level` (`wikitext-2-raw-v1`, test),
  one article per row (`page`). That dataset's builder (`wikitext_document_level.py`, kept as
  `.py.backup` in the dataset repository next to the parquet files now served) reads the
  release's `wiki.test.raw`, splits it on "\n", starts a new page at each article title line
  (" = Title = ", not a section's " = = Title = = ") and joins a page's lines with "\n"; text
  before the first title is dropped when blank, and the last page keeps the text's final empty
  line (it ends in "\n").
  We hold the Hugging Face `Salesforce/wikitext` rows instead (`"\n\n".join(rows)`). That
  builder yields each line of `wiki.test.raw` as a row, a blank line as "". The release text is
  rebuilt as `"".join(row or " \n")`: WikiText's blank lines are " \n" (one space, as every
  line starts with one) — seen in a copy of the WikiText-2 `wiki.test.tokens` head
  (GitHub arsfox/java1, commit 6d9febd1). This gives 62 pages.
  Not verifiable offline: that every blank line of `wiki.test.raw` is " \n" (it changes the
  page bytes lm-eval counts; the rebuilt text is 1,290,590 bytes), and that the parquet files
  now served are the builder's output unchanged.

HFLM conventions (lm-eval 0.4.13; `facts` in the result holds the values it used):
* `add_bos_token` is None: the tokenizer's own default applies (stories260K's prepends BOS).
* LAMBADA: context = the text without its last " word", target = " word"; context+target is
  encoded once (with BOS) and the target is the tokens past the context's own encoding.
* WikiText: the page is detokenized (`wikitext_detokenizer`) and encoded, BOS included, into T
  (N tokens). `max_length` L is the config's `max_position_embeddings` (512 here). The first
  window predicts T[:L] from `prefix_token_id` (BOS, else EOS) + T[:L-1], so log P(BOS | BOS)
  is part of every page's log-likelihood; each following full window predicts the next L tokens
  from the one token before them onwards (disjoint windows, 1 token of carried context); the
  last, shorter window ending at N takes the L tokens before N as its input (more context).
  Checked: plain torch on these windows gives lm-eval's log-likelihood of two pages to 1e-8.
* Batching: the batch size moves per-example LAMBADA log-likelihoods by up to ~2e-6 relative
  (float32 padding effects); the aggregates by ~4e-8.

Run by hand: `python -m tests.lm_eval_reference MODEL_DIR WORKDIR [LIMIT]` prints the result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO.parent / "shared" / "data" / "text"
LAMBADA = TEXT / "lambada" / "lambada_test.jsonl"
WIKITEXT = TEXT / "wikitext-2-raw" / "wiki.test.joined.txt"
BATCH_SIZE = 16  # the fastest of 4-256 for stories260K on 2 CPU cores


def hf_rows(joined: str) -> list[str]:
    """The HF rows back from `"\\n\\n".join(rows)`: a row is "" or one line ending in "\\n"."""
    rows, pos = [], 0
    while True:
        at_empty_row = pos == len(joined) or joined.startswith("\n\n", pos)
        end = pos if at_empty_row else joined.index("\n", pos) + 1
        rows.append(joined[pos:end])
        if end == len(joined):
            break
        if not joined.startswith("\n\n", end):
            raise ValueError(f"no row separator at offset {end}")
        pos = end + 2
    if "\n\n".join(rows) != joined:
        raise ValueError("the rows do not join back to the text")
    return rows


def _is_article_title(line: str) -> bool:
    """A page's first line, " = Title = ", not a section's " = = Title = = "."""
    squeezed = line.replace("= = =", "===").replace("= =", "==").strip()
    return squeezed.startswith("= ") and squeezed.endswith(" =")


def release_text(joined_path: Path = WIKITEXT) -> str:
    """`wiki.test.raw` rebuilt from the HF rows (see the module docstring)."""
    return "".join(row or " \n" for row in hf_rows(joined_path.read_text(encoding="utf-8")))


def wikitext_pages(joined_path: Path = WIKITEXT) -> list[str]:
    """The `page` documents of `EleutherAI/wikitext_document_level` (wikitext-2-raw-v1, test),
    rebuilt from the HF rows (see the module docstring)."""
    pages, lines = [], []
    for line in release_text(joined_path).split("\n"):
        if _is_article_title(line):
            if "\n".join(lines).strip():
                pages.append("\n".join(lines))
            lines = []
        lines.append(line)
    return pages + ["\n".join(lines)]


def write_tasks(workdir: Path, lambada_jsonl: Path, wikitext_joined: Path) -> None:
    """lm-eval's own task YAML, included, over local data: `lambada_local`, `wikitext_local`."""
    import lm_eval.tasks

    tasks = Path(lm_eval.tasks.__file__).parent
    pages = workdir / "wikitext_pages.jsonl"
    pages.write_text("".join(json.dumps({"page": page}) + "\n"
                             for page in wikitext_pages(wikitext_joined)))
    for name, include, data in [("lambada_local", "lambada/lambada_openai.yaml", lambada_jsonl),
                                ("wikitext_local", "wikitext/wikitext.yaml", pages)]:
        config = {"include": str(tasks / include), "task": name, "tag": [],
                  "dataset_path": "json", "dataset_name": None, "test_split": "test",
                  # lm-eval's wikitext.yaml also names train/validation splits: ours has none
                  "training_split": None, "validation_split": None,
                  # cache_dir keeps the datasets library's Arrow cache out of ~/.cache
                  "dataset_kwargs": {"data_files": {"test": str(data)},
                                     "cache_dir": str(workdir / "hf-datasets")}}
        (workdir / f"{name}.yaml").write_text(json.dumps(config, indent=1))  # JSON is YAML


def _samples(out: dict, task: str) -> list[dict]:
    return sorted(out["samples"][task], key=lambda sample: sample["doc_id"])


def evaluate(model_dir: Path, workdir: Path, limit: int | None) -> dict:
    """lm-eval's numbers, computed in this process (`run_lm_eval` runs it in a child)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=BATCH_SIZE)
    out = simple_evaluate(model=lm, tasks=["lambada_local", "wikitext_local"], limit=limit,
                          task_manager=TaskManager(include_path=str(workdir)), log_samples=True,
                          bootstrap_iters=0)  # no stderr: bootstrapping perplexity takes minutes
    lambada, wikitext = out["results"]["lambada_local"], out["results"]["wikitext_local"]
    bos = lm.tokenizer.bos_token_id
    return {
        "lambada": {"acc": lambada["acc,none"], "perplexity": lambada["perplexity,none"]},
        "wikitext": {key: wikitext[f"{key},none"]
                     for key in ("word_perplexity", "byte_perplexity", "bits_per_byte")},
        # per document, in data order: the target's log-likelihood and whether greedy decoding
        # gives it; the page's rolling log-likelihood, its words and bytes (process_results')
        "lambada_samples": [dict(zip(("ll", "is_greedy"), s["filtered_resps"][0]))
                            for s in _samples(out, "lambada_local")],
        "wikitext_samples": [{"ll": s["word_perplexity"][0], "words": s["word_perplexity"][1],
                              "bytes": s["byte_perplexity"][1]}
                             for s in _samples(out, "wikitext_local")],
        "facts": {"lm_eval_version": out["lm_eval_version"], "add_bos_token": lm.add_bos_token,
                  "encode_prepends_bos": lm.tok_encode("a")[:1] == [bos],
                  "prefix_token_id": lm.prefix_token_id, "bos_token_id": bos,
                  "eos_token_id": lm.tokenizer.eos_token_id, "max_length": lm.max_length,
                  "batch_size": BATCH_SIZE},
    }


def run_lm_eval(model_dir: Path, lambada_jsonl: Path, wikitext_joined: Path, workdir: Path,
                limit: int | None = None) -> dict:
    """lm-eval's metrics, per-document log-likelihoods and HFLM facts for `model_dir` (see the
    module docstring); `limit`: the first documents of each task only. lm-eval runs in a child
    process: the Hugging Face libraries read their offline switches once, at import, and lm-eval
    seeds the global random generators."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    args = [model_dir, lambada_jsonl, wikitext_joined, workdir, limit or ""]
    subprocess.run([sys.executable, "-m", "tests.lm_eval_reference", "--child", *map(str, args)],
                   cwd=REPO, env=env, check=True)
    return json.loads((workdir / "lm_eval_result.json").read_text())


def main(argv: list[str]) -> None:
    if argv[0] == "--child":
        model_dir, lambada_jsonl, wikitext_joined, workdir = map(Path, argv[1:5])
        write_tasks(workdir, lambada_jsonl, wikitext_joined)
        result = evaluate(model_dir, workdir, int(argv[5]) if argv[5] else None)
        (workdir / "lm_eval_result.json").write_text(json.dumps(result))
        return
    limit = int(argv[2]) if len(argv) > 2 else None
    result = run_lm_eval(Path(argv[0]), LAMBADA, WIKITEXT, Path(argv[1]), limit)
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_samples")}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
