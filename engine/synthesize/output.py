"""The corpus artifact: the generated shards filtered in corpus order into `part-<k>.jsonl` (one
row per kept completion; a shard that keeps nothing has no part), `tables/samples.json` (the
first kept completions, as columns: MLflow's table; in a subfolder, which readers of the corpus
folder pass over), and the manifest with the counts and the throughput. The tokenize stage reads
the folder as it is (its top-level JSONL files)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from engine.atomic import StagedFiles
from engine.errors import InputError
from engine.manifest import Manifest, sha256_file, write_manifest
from engine.synthesize.filters import RowFilter
from engine.synthesize.shards import ShardStore
from engine.synthesize.spec import Spec

SAMPLES = "tables/samples.json"
SAMPLE_COLUMNS = ("document", "prefix", "completion", "finish_reason", "completion_tokens")
_COUNTED = ("documents", "prompts", "completions", "generated_tokens", "empty_documents",
            "short_documents", "short_documents_whole", "max_tokens_cut")


def write_corpus(spec: Spec, store: ShardStore, count: int, inputs: dict[str, str],
                 fingerprint: str, wall_s: float) -> Manifest:
    out = Path(spec.output)
    stats = [store.stats(k) for k in range(count)]
    if not any(s["prompts"] for s in stats):
        skipped = {key: sum(s.get(key, 0) for s in stats)
                   for key in ("empty_documents", "short_documents")}
        raise InputError(f"{', '.join(spec.input)}: no document gave a prompt "
                         f"({skipped['empty_documents']} empty, {skipped['short_documents']} "
                         f"shorter than prefix_tokens {spec.prefix_tokens}: see short_documents)")
    rows_filter = RowFilter(spec.filters)
    samples: list[dict] = []
    kept_tokens = 0
    with StagedFiles() as staged:
        for k in range(count):
            kept = [r for r in store.rows(k) if rows_filter.reason(r) is None]
            if kept:
                _write_rows(staged.stage(out / f"part-{k:05d}.jsonl"), kept)
            kept_tokens += sum(r["completion_tokens"] for r in kept)
            samples += kept[:spec.samples - len(samples)]
        if not rows_filter.counts["kept"]:
            raise InputError(f"every completion was filtered out ({_reasons(rows_filter)}); "
                             f"the generated shards stay in {store.root}: run again with other "
                             f"filters to reuse them")
        table = {c: [r[c] for r in samples] for c in SAMPLE_COLUMNS}
        with open(staged.stage(out / SAMPLES), "w", encoding="utf-8") as f:
            json.dump(table, f, ensure_ascii=False, indent=1)
        staged.commit()
    files = {p.name: sha256_file(p) for p in sorted(out.glob("part-*.jsonl"))}
    files[SAMPLES] = sha256_file(out / SAMPLES)
    summary = _summary(stats, rows_filter, kept_tokens, wall_s)
    summary["teacher"] = inputs["teacher"]
    manifest = Manifest(kind="corpus", stage="synthesize", spec=spec.model_dump(mode="json"),
                        inputs=inputs, fingerprint=fingerprint, summary=summary, files=files)
    write_manifest(out, manifest)
    return manifest


def _write_rows(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _reasons(rows_filter: RowFilter) -> str:
    return ", ".join(f"{n} {why}" for why, n in sorted(rows_filter.counts.items()))


def _summary(stats: list[dict], rows_filter: RowFilter, kept_tokens: int, wall_s: float) -> dict:
    """Counts over all shards, and throughput from the shards' own generation times: real
    tokens (a completion that stopped early counts what it generated), summed over ranks."""
    totals = {key: sum(s.get(key, 0) for s in stats) for key in _COUNTED}
    seconds = sum(s["seconds"] for s in stats)
    finish = sum((Counter(s["finish_reasons"]) for s in stats), Counter())
    filtered = {why: n for why, n in rows_filter.counts.items() if why != "kept"}
    per_s = max(seconds, 1e-9)
    return {**totals, "kept": rows_filter.counts["kept"], "kept_tokens": kept_tokens,
            "filtered": filtered, "finish_reasons": dict(finish),
            "shards": len(stats), "backend": stats[0]["backend"] if stats else None,
            "ranks": len({s["rank"] for s in stats}),
            "throughput": {"generation_seconds": round(seconds, 3),
                           "tokens_per_second": round(totals["generated_tokens"] / per_s, 1),
                           "prompts_per_second": round(totals["prompts"] / per_s, 3),
                           "wall_seconds": round(wall_s, 3)}}
