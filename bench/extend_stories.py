"""Context extension on the real stories260K model (docs/training.md, "Context extension"):
perplexity over 512-, 1,024- and 2,048-token windows of a held-out book, and passkey retrieval,
for the base model extrapolating, YaRN ×4 without training, and PI ×2 / PI ×4 / YaRN ×4 after
the same short training on books — against a control trained as long on the same books at the
original 512 positions (what the books alone teach it).

    python -m bench.extend_stories --work /tmp/extend-stories [--iters 60]

Reads ../shared/data (a benchmark, not the project, may). CPU, ~10 minutes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engine.convert import stage as convert
from engine.data import tokenize
from engine.evaluate.spec import Spec as EvaluateSpec
from engine.evaluate.stage import run as evaluate
from engine.extend import stage as extend
from engine.extend.spec import Spec as ExtendSpec
from engine.spec import load_spec
from engine.train.loop import train
from engine.train.spec import FinetuneSpec

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TRAIN_BOOKS = ("pg1342.txt", "pg2701.txt", "pg345.txt")  # Austen, Melville, Stoker
HELDOUT_BOOK = "pg98.txt"                                # Dickens
LENGTHS = (512, 1024, 2048)
VARIANTS = {  # name: (context, training sequence length); None: not extended
    "control: trained at 512": (None, 512),
    "PI x2": ({"max_length": 1024, "method": "linear"}, 1024),
    "PI x4": ({"max_length": 2048, "method": "linear"}, 2048),
    "YaRN x4": ({"max_length": 2048, "method": "yarn"}, 2048),
}


def chunks(name: str, paragraphs: int = 40) -> list[str]:
    paras = [p.strip() for p in (SHARED / "text" / "gutenberg" / name).read_text().split("\n\n")
             if p.strip()]
    return ["\n\n".join(paras[i:i + paragraphs]) for i in range(0, len(paras), paragraphs)]


def prepare(work: Path) -> tuple[Path, str, Path]:
    parent = work / "parent"
    if not parent.exists():
        convert.run(convert.Spec(load_dir=str(SHARED / "tiny-llama" / "hf"), save_dir=str(parent),
                                 source_format="hf", target_format="native"))
    books, heldout = work / "books.jsonl", work / "heldout.jsonl"
    books.write_text("".join(json.dumps({"text": c}) + "\n"
                             for name in TRAIN_BOOKS for c in chunks(name)))
    heldout.write_text("".join(json.dumps({"text": c}) + "\n" for c in chunks(HELDOUT_BOOK)[:24]))
    if not (work / "books_text_document.bin").exists():
        tokenize.run(tokenize.Spec(input=[str(books)], output_prefix=str(work / "books"),
                                   tokenizer=str(parent / "tokenizer" / "tokenizer.model"),
                                   add_bos=True, progress=False))
    return parent, str(work / "books_text_document"), heldout


def measure(model: Path, heldout: Path, out: Path, tokenizer: Path) -> dict[str, float]:
    if not out.exists():
        evaluate(load_spec(EvaluateSpec, None, {
            "load_dir": str(model), "output": str(out), "ppl": [str(heldout)],
            "windows": [str(n) for n in LENGTHS], "passkey": list(LENGTHS),
            "passkey_trials": 4, "tokenizer": str(tokenizer), "progress": False}))
    report = json.loads((out / "report.json").read_text())
    return {name.split("/")[-2] if name.startswith("ppl") else name: round(value, 3)
            for name, value in report["metrics"].items()}


def trained(parent: Path, data: str, work: Path, name: str, context: dict | None, seq: int,
            iters: int) -> Path:
    save = work / name.replace(" ", "_").replace(":", "")
    if not save.exists():
        spec = {"load": str(parent), "checkpoint": {"save": str(save)},
                "data": {"blend": [data], "seq_length": seq, "split": "99,1,0"},
                "iters": iters, "global_batch_size": 8 * 512 // seq * 2,
                "micro_batch_size": 8 * 512 // seq * 2, "precision": "fp32", "device": "cpu",
                "optim": {"lr": 2e-3, "min_lr": 2e-4, "warmup_iters": 5}}
        if context is not None:
            spec["context"] = context
        train(FinetuneSpec.model_validate(spec), "finetune")
    return save


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/extend-stories"))
    ap.add_argument("--iters", type=int, default=60)
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    parent, data, heldout = prepare(work)
    tok = parent / "tokenizer"
    results = {"base (extrapolating)": measure(parent, heldout, work / "eval-base", tok)}
    yarn = work / "yarn-untrained"
    if not yarn.exists():
        extend.run(ExtendSpec(input=str(parent), output=str(yarn),
                              context={"max_length": 2048, "method": "yarn"}))
    results["YaRN x4, no training"] = measure(yarn, heldout, work / "eval-yarn-untrained", tok)
    for name, (context, seq) in VARIANTS.items():
        model = trained(parent, data, work, name, context, seq, args.iters)
        results[name] = measure(model, heldout, work / f"eval-{model.name}", tok)
        print(name, results[name], flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
