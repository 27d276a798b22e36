"""Benchmark `engine tokenize` against a Megatron-LM `tools/preprocess_data.py`-style baseline.

Both turn the same JSONL corpus (real text: Project Gutenberg books in 4-8 KB chunks of paragraphs
and WikiText-2 articles) into a Megatron indexed dataset with the Llama-2 SentencePiece tokenizer
and an EOD after each document, at the same number of worker processes. The outputs must be
identical byte for byte; throughput is reported in tokens per second (best and median of trials).

    .venv/bin/python -m bench.tokenize [--workers 1 2] [--repeat 3] [--trials 3]
"""

from __future__ import annotations

import argparse
import sys
import functools
import hashlib
import json
import multiprocessing
import os
import platform
import random
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HEADING = re.compile(r"^ = [^=].* = $")  # a WikiText article title; sections are ' = = x = = '


# --------------------------------------------------------------------------------------- corpus

def book_chunks(text: str, rng: random.Random, lo: int = 4096, hi: int = 8192) -> list[str]:
    """Consecutive paragraphs joined into documents of about lo..hi characters each."""
    paragraphs = [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
    docs, cur, size, target = [], [], 0, rng.randint(lo, hi)
    for p in paragraphs:
        if cur and size + len(p) > hi:
            docs.append("\n\n".join(cur))
            cur, size, target = [], 0, rng.randint(lo, hi)
        cur.append(p)
        size += len(p) + 2
        if size >= target:
            docs.append("\n\n".join(cur))
            cur, size, target = [], 0, rng.randint(lo, hi)
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def wiki_articles(text: str) -> list[str]:
    """WikiText split at its top-level headings (' = Title = '), one document per article."""
    docs, cur = [], []
    for line in text.splitlines(keepends=True):
        if HEADING.match(line.rstrip("\n")) and cur:
            docs.append("".join(cur))
            cur = []
        cur.append(line)
    if cur:
        docs.append("".join(cur))
    return [d.strip("\n") for d in docs if d.strip()]


def build_corpus(data: Path, repeat: int, out: Path) -> dict:
    rng = random.Random(0)
    books = sorted((data / "text" / "gutenberg").glob("*.txt"))
    wiki = data / "text" / "wikitext-2-raw" / "wiki.test.joined.txt"
    docs: list[str] = []
    n_book = 0
    for path in books:
        chunks = book_chunks(path.read_text(encoding="utf-8").replace("\r\n", "\n"), rng)
        n_book += len(chunks)
        docs += chunks
    articles = wiki_articles(wiki.read_text(encoding="utf-8"))
    docs += articles
    with open(out, "w", encoding="utf-8") as f:
        for _ in range(repeat):
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
    sizes = [len(d.encode("utf-8")) for d in docs]
    return {"books": len(books), "book_docs": n_book, "wiki_docs": len(articles),
            "unique_docs": len(docs), "docs": len(docs) * repeat, "repeat": repeat,
            "text_mb": sum(sizes) * repeat / 1e6, "jsonl_mb": out.stat().st_size / 1e6,
            "median_doc_kb": statistics.median(sizes) / 1e3}


# ------------------------------------------------------------------------------------- baseline
# Megatron-LM tools/preprocess_data.py, as described (not copied): a multiprocessing.Pool whose
# workers each load SentencePiece and encode one JSON line at a time; the main process converts each
# document via torch -> numpy and appends it to the .bin, keeping the lengths for the .idx.

_sp = None


def _baseline_init(model: str) -> None:
    global _sp
    import sentencepiece as spm
    _sp = spm.SentencePieceProcessor(model_file=model)


def _baseline_encode(line: str):
    text = json.loads(line)["text"]
    ids = _sp.encode_as_ids(text)
    if ids:
        ids.append(_sp.eos_id())
    return ids, len(line)


def baseline(corpus: Path, prefix: str, model: str, workers: int) -> float:
    import torch  # Megatron's tool imports torch in the main process

    from engine.data.indexed import write_index

    start = time.perf_counter()
    pool = multiprocessing.Pool(workers, initializer=_baseline_init, initargs=(model,))
    lengths: list[int] = []
    with open(corpus, "r", encoding="utf-8") as fin, open(prefix + ".bin", "wb") as fbin:
        for ids, _nbytes in pool.imap(_baseline_encode, fin, 32):
            array = np.array(torch.IntTensor(ids).numpy(), dtype=np.uint16)
            fbin.write(array.tobytes(order="C"))
            lengths.append(len(ids))
        with open(prefix + ".idx", "wb") as fidx:
            write_index(fidx, np.dtype(np.uint16), np.array(lengths, dtype=np.int32),
                        np.arange(len(lengths) + 1, dtype=np.int64))
    elapsed = time.perf_counter() - start
    pool.terminate()
    pool.join()
    return elapsed


# ------------------------------------------------------------------------------------------ ours

def ours(corpus: Path, prefix: str, model: str, workers: int, batch_lines: int | None = None) -> float:
    from engine.data.tokenize import Spec, output_files, run

    extra = {} if batch_lines is None else {"batch_lines": batch_lines}
    start = time.perf_counter()
    run(Spec(input=[str(corpus)], output_prefix=prefix, tokenizer=model, append_eod=True,
             workers=workers, progress=False, **extra))
    elapsed = time.perf_counter() - start
    bin_path, idx_path = output_files(prefix, "text")
    os.replace(bin_path, prefix + ".bin")
    os.replace(idx_path, prefix + ".idx")
    return elapsed


# ----------------------------------------------------------------------------------------- main

def digest(prefix: str) -> tuple[str, str, int]:
    """sha256 of the .bin, sha256 of the sequence lengths, token count."""
    from engine.data.indexed import IndexedDataset

    ds = IndexedDataset(prefix)
    lengths = np.asarray(ds.sequence_lengths)
    with open(prefix + ".bin", "rb") as f:
        bin_sha = hashlib.file_digest(f, "sha256").hexdigest()
    return bin_sha, hashlib.sha256(lengths.tobytes()).hexdigest(), int(lengths.sum(dtype=np.int64))


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help="shared data folder (default %(default)s)")
    ap.add_argument("--tokenizer", type=Path, default=DATA / "tokenizers" / "llama2" / "tokenizer.model",
                    help="SentencePiece model (default %(default)s)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts")
    ap.add_argument("--repeat", type=int, default=3, help="repeat the corpus K times")
    ap.add_argument("--trials", type=int, default=3, help="measurements per method and worker count")
    ap.add_argument("--batch-lines", type=int, default=None,
                    help="ours: lines per unit of work (default: the tokenize stage's own default)")
    args = ap.parse_args()

    import sentencepiece
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    try:
        corpus = tmp / "corpus.jsonl"
        c = build_corpus(args.data, args.repeat, corpus)
        model = str(args.tokenizer)
        print(f"machine: {cpu_model()}, os.cpu_count()={os.cpu_count()}")
        print(f"python {platform.python_version()}, sentencepiece {sentencepiece.__version__}, "
              f"numpy {np.__version__}, torch {torch.__version__}")
        from engine.data.tokenize import Spec
        batch_lines = args.batch_lines or Spec.model_fields["batch_lines"].default
        print(f"tokenizer: {args.tokenizer}; ours: batch_lines={batch_lines}, "
              f"{-(-c['docs'] // batch_lines)} batch(es)")
        desc = (f"{c['unique_docs']} documents ({c['book_docs']} chunks of 4-8 KB from {c['books']} "
                f"Gutenberg books, {c['wiki_docs']} WikiText-2 test articles), median "
                f"{c['median_doc_kb']:.1f} KB")
        if c["repeat"] > 1:
            desc += (f", repeated x{c['repeat']} (documents duplicated to stand for a larger corpus) "
                     f"-> {c['docs']} documents")
        print(f"corpus: {desc}; {c['text_mb']:.1f} MB of text, {c['jsonl_mb']:.1f} MB JSONL")
        print(f"trials: {args.trials} per method and worker count (best = min time; median); "
              f"load average before: {load_average()}\n")

        reference = None
        identical = True
        times: dict[tuple[str, int], list[float]] = {}
        tokens = 0
        for workers in args.workers:
            for trial in range(args.trials):
                order = [("baseline", baseline),
                         ("ours", functools.partial(ours, batch_lines=args.batch_lines))]
                if trial % 2:
                    order.reverse()  # alternate which goes first
                for name, fn in order:
                    prefix = str(tmp / f"{name}_w{workers}_t{trial}")
                    t = fn(corpus, prefix, model, workers)
                    d = digest(prefix)
                    if reference is None:
                        reference = d
                    same = d == reference
                    identical &= same
                    tokens = d[2]
                    times.setdefault((name, workers), []).append(t)
                    print(f"  workers={workers} trial={trial + 1} {name:8s} {t:7.2f} s "
                          f"{d[2] / t:>12,.0f} tok/s{'' if same else '  OUTPUT DIFFERS'}", flush=True)
                    for ext in (".bin", ".idx"):
                        if not (name == "baseline" and workers == args.workers[0] and trial == 0):
                            Path(prefix + ext).unlink(missing_ok=True)

        print(f"\n{tokens:,} tokens per run\n")
        print("| workers | baseline tokens/s (best / median) | ours tokens/s (best / median) "
              "| speed-up (best / median) |")
        print("|---:|---:|---:|---:|")
        for workers in args.workers:
            b, o = times[("baseline", workers)], times[("ours", workers)]
            bb, bm = tokens / min(b), tokens / statistics.median(b)
            ob, om = tokens / min(o), tokens / statistics.median(o)
            print(f"| {workers} | {bb:,.0f} / {bm:,.0f} | {ob:,.0f} / {om:,.0f} "
                  f"| {ob / bb:.2f}x / {om / bm:.2f}x |")
        print(f"\nload average after: {load_average()}")
        print(f"outputs identical: {'yes' if identical else 'no'}")
        return 0 if identical else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
