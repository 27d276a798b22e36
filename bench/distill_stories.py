"""Distillation from the real stories260K model (docs/training.md, "Distillation"): held-out
perplexity of a small student trained for the same number of tokens with cross-entropy on the
original stories, on a blend of the original and the teacher's synthetic continuations, with
logit KD from the teacher, and with both.

    python -m bench.distill_stories --work /tmp/distill-stories [--iters 1200] [--stories 1000]
                                    [--original samples|templates] [--seeds 1]

Teacher: stories260K (../shared/data/tiny-llama/hf, converted to native; 5 layers, hidden 64,
0.26M parameters). Student: a fresh, randomly initialised 3-layer, hidden-48 model (6 heads of 8,
3 KV heads, SwiGLU 128, tied head; 0.10M parameters, 39% of the teacher) on the teacher's
tokenizer. Fresh rather than a pruned stories260K: a pruned parent already holds most of what
the teacher knows, which would mute the differences between the training signals (and
bench/prune_stories.py measures KD recovery after pruning already); a student from nothing shows
what each signal teaches.

Original data (--original samples, the default): TinyStories-style stories sampled from the
teacher at temperature 1 from BOS, each ending where the teacher starts a new one (its BOS, as
llama2.c's models end a story); ../shared/data has only five real TinyStories, too few to train
on. The held-out stories are more such samples (other seeds). --original templates uses
`generate-corpus` template stories instead (held out: another seed): a grammar so small that the
student learns it far below the teacher's perplexity, so the teacher is no expert there.
The five real TinyStories (../shared/data/text/tinystories) are scored too, as a second column:
real text of the teacher's domain that no training set contains.
Synthetic data: `synthesize` (engine backend) continues the first PREFIX_TOKENS tokens of each
original story with the teacher (temperature 1, top-p 1: samples of the teacher's own
distribution, not the Cookbook's sharper 0.7 / 0.9; up to 200 new tokens, ending at BOS).
Every student: same seed (same initial weights; same data order where the data are the same),
optimiser and schedule, ITERS × GLOBAL_BATCH × SEQ_LENGTH training tokens. The blends weigh
original and synthetic 0.5 / 0.5. KD: alpha 0.5 (half cross-entropy with the data, half
τ²·KL(teacher ‖ student)), τ = 1, full vocabulary (512 tokens). Perplexity: evaluate's ppl in
256-position windows from each story's BOS, the same for every model: one per sampled story
(at most 255 tokens; 200 stories, 50k tokens), two for one of the real ones (1.8k tokens).
--seeds N trains every variant with seeds 1234 … 1234 + N − 1 (~5 more minutes each) and prints
the mean and range of each perplexity and of each seed's change against CE: one seed is a first
look, not a verdict (over three seeds the KD students' held-out perplexity spans 6%, the CE
students' 0.4%).

Reads ../shared/data (a benchmark, not the project, may). CPU, ~6 minutes on 2 free cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from engine.convert import stage as convert
from engine.convert.native import load_native
from engine.data import synthetic, tokenize
from engine.data.tokenizer import load_tokenizer
from engine.evaluate.spec import Spec as EvaluateSpec
from engine.evaluate.stage import run as evaluate
from engine.generate.generator import Generator
from engine.generate.params import SamplingParams
from engine.spec import load_spec
from engine.synthesize import stage as synthesize
from engine.synthesize.spec import Spec as SynthesizeSpec
from engine.train.loop import train
from engine.train.spec import PretrainSpec

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STUDENT = {"vocab_size": 512, "hidden_size": 48, "intermediate_size": 128, "num_layers": 3,
           "num_heads": 6, "num_kv_heads": 3, "max_position_embeddings": 512,
           "tie_word_embeddings": True}
SEQ_LENGTH, GLOBAL_BATCH = 256, 8  # not 16 (same tokens): CE's seed spread fell from 20% to 2%
OPTIM = {"lr": 5e-3, "min_lr": 5e-4, "warmup_iters": 10}
HELDOUT = 200            # held-out stories
BOS = 1                  # stories260K ends a story by starting the next one
PREFIX_TOKENS = {"samples": 32, "templates": 16}  # prompts of the synthesize stage
WINDOW = "256"
BLEND_WEIGHTS = ("0.5", "0.5")  # original, synthetic
KD = {"alpha": 0.5, "temperature": 1.0}
VARIANTS = {  # name: (synthetic data in the blend, distillation)
    "CE, original": (False, False),
    "CE, original + synthetic": (True, False),
    "CE + KD, original": (False, True),
    "CE + KD, original + synthetic": (True, True),
}


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def sampled_stories(teacher: Path, count: int, work: Path) -> tuple[Path, Path]:
    """`count` training and HELDOUT held-out stories sampled from the teacher from BOS."""
    _, model, _, _ = load_native(teacher)
    tok = load_tokenizer(teacher / "tokenizer")
    gen = Generator(model, tok, torch.device("cpu"), progress=False)
    n = count + HELDOUT
    params = [SamplingParams(temperature=1.0, max_tokens=255, stop_token_ids=[BOS], seed=i)
              for i in range(n)]
    texts = [c[0].text.strip() for c in gen.generate([[BOS]] * n, params)]
    return (write_jsonl(work / "original" / "stories.jsonl", texts[:count]),
            write_jsonl(work / "heldout" / "stories.jsonl", texts[count:]))


def template_stories(count: int, work: Path) -> tuple[Path, Path]:
    out = []
    for name, documents, seed in (("original", count, 1234), ("heldout", HELDOUT, 4321)):
        if not (work / name).exists():
            synthetic.run(synthetic.Spec(output=str(work / name), documents=documents,
                                         shards=1, seed=seed, name="stories"))
        out.append(work / name / "stories-000.jsonl")
    return out[0], out[1]


def prepare(work: Path, original: str, stories: int) -> tuple[Path, dict[str, Path]]:
    """The teacher (native), the original and synthetic datasets, the held-out JSONL files."""
    teacher = work / "teacher"
    if not teacher.exists():
        convert.run(convert.Spec(load_dir=str(SHARED / "tiny-llama" / "hf"), save_dir=str(teacher),
                                 source_format="hf", target_format="native"))
    if original == "samples":
        done = (work / "heldout" / "stories.jsonl").exists()
        train_jsonl, heldout = ((work / "original" / "stories.jsonl", work / "heldout" /
                                 "stories.jsonl") if done else sampled_stories(teacher, stories,
                                                                               work))
    else:
        train_jsonl, heldout = template_stories(stories, work)
    raw = (SHARED / "text" / "tinystories" / "tinystories_sample.txt").read_text()
    tinystories = write_jsonl(work / "tinystories.jsonl",
                              [s.strip() for s in raw.split("<|endoftext|>") if s.strip()])
    if not (work / "synthetic").exists():
        synthesize.run(SynthesizeSpec(
            input=[str(train_jsonl)], teacher=str(teacher), output=str(work / "synthetic"),
            prefix_tokens=PREFIX_TOKENS[original], backend="engine", device="cpu",
            progress=False, sampling={"temperature": 1.0, "top_p": 1.0, "max_tokens": 200,
                                      "stop_token_ids": [BOS]}))
    out = {"heldout": heldout, "tinystories": tinystories}
    tok = str(teacher / "tokenizer" / "tokenizer.model")
    for name, source in (("original", train_jsonl), ("synthetic", work / "synthetic")):
        # not the corpus folder's own path: a prefix naming a folder writes its manifest inside
        prefix = work / f"{name}-tokens"
        out[name] = work / f"{prefix.name}_text_document"
        if not Path(f"{out[name]}.bin").exists():
            tokenize.run(tokenize.Spec(input=[str(source)], output_prefix=str(prefix),
                                       tokenizer=tok, add_bos=True, progress=False))
    return teacher, out


def dataset_tokens(prefix: Path) -> int:
    return json.loads(Path(f"{prefix.parent / prefix.name.removesuffix('_text_document')}"
                           ".manifest.json").read_text())["summary"]["tokens"]


def measure(model: Path, data: dict[str, Path], out: Path, tokenizer: Path) -> dict[str, float]:
    if not out.exists():
        evaluate(load_spec(EvaluateSpec, None, {
            "load_dir": str(model), "output": str(out), "tokenizer": str(tokenizer),
            "windows": [WINDOW], "progress": False,
            "ppl": [str(data["heldout"]), str(data["tinystories"])]}))
    metrics = json.loads((out / "report.json").read_text())["metrics"]
    return {name: metrics[f"ppl/{data[name].name}/{WINDOW}:{WINDOW}/ppl"]
            for name in ("heldout", "tinystories")}


def trained(teacher: Path, data: dict[str, Path], work: Path, name: str, blend: bool, kd: bool,
            iters: int, seed: int) -> Path:
    save = work / ("".join(c for c in name.replace(" ", "_") if c.isalnum() or c in "_-")
                   + f"-seed{seed}")
    if not save.exists():
        sets = ([BLEND_WEIGHTS[0], str(data["original"]), BLEND_WEIGHTS[1], str(data["synthetic"])]
                if blend else [str(data["original"])])
        spec = {"model": STUDENT, "checkpoint": {"save": str(save)},
                "data": {"blend": sets, "seq_length": SEQ_LENGTH, "split": "100,0,0"},
                "iters": iters, "global_batch_size": GLOBAL_BATCH,
                "micro_batch_size": GLOBAL_BATCH, "precision": "fp32", "device": "cpu",
                "log_interval": 50, "optim": OPTIM, "seed": seed}
        if kd:
            spec["distill"] = {"teacher": str(teacher), **KD}
        train(PretrainSpec.model_validate(spec), "pretrain")
    return save


def cell(values: list[float], form: str) -> str:
    """One number, or the mean of several and their range."""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return format(mean, form)
    return f"{mean:{form}} ({min(values):{form}} to {max(values):{form}})"


def table(results: dict[str, list[dict[str, float]]], tokens: int, original: str) -> str:
    base = results["CE, original"]
    lines = [f"| variant | training tokens | held-out PPL ({original}) | vs CE | "
             f"real TinyStories PPL | vs CE |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, runs in results.items():
        student = name in VARIANTS
        cells = []
        for key, form in (("heldout", ".3f"), ("tinystories", ".2f")):
            cells.append(cell([r[key] for r in runs], form))
            changes = [100 * (r[key] / b[key] - 1) for r, b in zip(runs, base)]
            cells.append(cell(changes, "+.1f") + " %" if student else "")
        lines.append(f"| {name} | {f'{tokens:,}' if student else '—'} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/distill-stories"))
    ap.add_argument("--original", choices=("samples", "templates"), default="samples")
    ap.add_argument("--stories", type=int, default=1000)
    ap.add_argument("--iters", type=int, default=1200)
    ap.add_argument("--seeds", type=int, default=1, help="students per variant (seeds 1234, …)")
    args = ap.parse_args()
    started = time.perf_counter()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    teacher, data = prepare(work, args.original, args.stories)
    print(f"data ready after {time.perf_counter() - started:.0f} s: original "
          f"{dataset_tokens(data['original']):,} tokens, synthetic "
          f"{dataset_tokens(data['synthetic']):,}", flush=True)
    tok = teacher / "tokenizer"  # the students' too (a fresh model's checkpoint has none)
    results = {"teacher (stories260K)": [measure(teacher, data, work / "eval-teacher", tok)]}
    for seed in range(1234, 1234 + args.seeds):
        for name, (blend, kd) in VARIANTS.items():
            model = trained(teacher, data, work, name, blend, kd, args.iters, seed)
            results.setdefault(name, []).append(
                measure(model, data, work / f"eval-{model.name}", tok))
            print(name, f"seed {seed}", results[name][-1],
                  f"{time.perf_counter() - started:.0f} s", flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print()
    print(table(results, args.iters * GLOBAL_BATCH * SEQ_LENGTH, args.original))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
