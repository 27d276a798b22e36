"""The evaluation report: `report.json` (every record, plus flat headline metrics) and `report.md`
(the same as Markdown tables); `compare_reports` puts several reports side by side.

report.json: {"model": {...}, "settings": {...}, "metrics": {name: value}, "records": [...],
"timing_s": {suite: seconds}}. Each record has a "suite" key (ppl, wikitext, lambada, fineval);
metric names are "<suite>/..." paths, stable across runs, so reports of different models (or of
one model over time) can be compared by name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

REPORT_JSON, REPORT_MD, DOCUMENTS_JSONL = "report.json", "report.md", "documents.jsonl"


def headline_metrics(records: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in records:
        suite = r["suite"]
        if suite == "ppl":
            out[f"ppl/{r['dataset']}/{r['seq_length']}:{r['stride']}/ppl"] = r["ppl"]
        elif suite == "wikitext":
            base = f"wikitext/{r['convention']}/{r['seq_length']}:{r['stride']}"
            for key in ("word_ppl", "byte_ppl", "bits_per_byte", "token_ppl"):
                out[f"{base}/{key}"] = r[key]
        elif suite == "lambada":
            for key in ("accuracy", "accuracy_strict", "ppl_word", "ppl_token"):
                out[f"lambada/{r['convention']}/{key}"] = r[key]
        elif suite == "passkey":
            out[f"passkey/{r['length']}/accuracy"] = r["accuracy"]
        elif suite == "fineval" and r["level"] != "subject":
            base = f"fineval/{r['shots']}-shot/{r['method']}/{r['name']}"
            out[f"{base}/accuracy"] = r["accuracy"]
            out[f"{base}/accuracy_subject_avg"] = r["accuracy_subject_avg"]
    return out


def _num(name: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and ("accuracy" in name or name == "acc"):
        return f"{100 * value:.2f}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def _table(header: list[str], rows: Iterable[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_num(h, v) for h, v in zip(header, row)) + " |" for row in rows]
    return lines + [""]


def render_markdown(report: dict) -> str:
    model = report["model"]
    settings = ", ".join(f"{k} {v}" for k, v in report["settings"].items())
    lines = [f"# Evaluation of {model['name']}", "",
             f"`{model['path']}` ({model['format']}, {model['parameters']:,} parameters); "
             f"{settings}. Accuracies in %.", ""]
    by_suite: dict[str, list[dict]] = {}
    for r in report["records"]:
        by_suite.setdefault(r["suite"], []).append(r)
    if "ppl" in by_suite:
        lines += ["## Perplexity (token level)", ""]
        lines += _table(["dataset", "length:stride", "documents", "tokens", "mean NLL", "ppl"],
                        ([r["dataset"], f"{r['seq_length']}:{r['stride']}", r["documents"],
                          r["tokens"], r["mean_nll"], r["ppl"]] for r in by_suite["ppl"]))
    if "wikitext" in by_suite:
        lines += ["## WikiText (word and byte level)", ""]
        lines += _table(["dataset", "convention", "length:stride", "documents", "words", "bytes",
                         "tokens", "word ppl", "byte ppl", "bits per byte", "token ppl"],
                        ([r["dataset"], r["convention"], f"{r['seq_length']}:{r['stride']}",
                          r["documents"], r["words"], r["bytes"], r["tokens"], r["word_ppl"],
                          r["byte_ppl"], r["bits_per_byte"], r["token_ppl"]]
                         for r in by_suite["wikitext"]))
    if "lambada" in by_suite:
        lines += ["## LAMBADA (last word)", ""]
        lines += _table(["dataset", "convention", "examples", "accuracy (greedy)",
                         "accuracy (strict)", "ppl (per word)", "ppl (per token)"],
                        ([r["dataset"], r["convention"], r["examples"], r["accuracy"],
                          r["accuracy_strict"], r["ppl_word"], r["ppl_token"]]
                         for r in by_suite["lambada"]))
    if "passkey" in by_suite:
        depths = list(by_suite["passkey"][0]["by_depth"])
        lines += ["## Passkey retrieval", ""]
        lines += _table(["length", "tokens", "trials", "accuracy"]
                        + [f"accuracy at depth {d}" for d in depths],
                        ([r["length"], r["tokens"], r["trials"], r["accuracy"]]
                         + [r["by_depth"][d] for d in depths] for r in by_suite["passkey"]))
    if "fineval" in by_suite:
        lines += _fineval_markdown(by_suite["fineval"])
    return "\n".join(lines)


def _fineval_markdown(records: list[dict]) -> list[str]:
    runs = sorted({(r["shots"], r["method"]) for r in records})
    overall = [r for r in records if r["level"] == "overall"]
    lines = ["## FinEval", ""]
    lines += _table(["shots", "method", "questions", "accuracy", "accuracy (subject avg)",
                     "prompts truncated"],
                    ([r["shots"], r["method"], r["questions"], r["accuracy"],
                      r["accuracy_subject_avg"], r["prompts_truncated"]] for r in overall))
    columns = [f"{k}-shot {m}" for k, m in runs]
    for level, title in (("category", "By category (question-weighted / subject avg)"),
                         ("subject", "By subject")):
        cells: dict[str, dict[str, str]] = {}
        for r in records:
            if r["level"] == level:
                value = _num("accuracy", r["accuracy"])
                if level == "category":
                    value += " / " + _num("accuracy", r["accuracy_subject_avg"])
                label = (r["name"] if level == "category"
                         else f"{r['name']} ({r['name_zh']}, {r['category']})")
                run = f"{r['shots']}-shot {r['method']}"
                cells.setdefault(label, {"n": r["questions"]})[run] = value
        lines += [f"### {title}", ""]
        lines += _table([level, "questions"] + columns,
                        ([name, row["n"]] + [row.get(c, "–") for c in columns]
                         for name, row in cells.items()))
    return lines


def strict_json(value: Any) -> Any:
    """NaN and infinities as null: report.json stays standard JSON that any tool can read."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_report(folder: Path, report: dict) -> list[str]:
    text = json.dumps(strict_json(report), indent=2, ensure_ascii=False, allow_nan=False)
    (folder / REPORT_JSON).write_text(text + "\n", encoding="utf-8")
    (folder / REPORT_MD).write_text(render_markdown(report) + "\n", encoding="utf-8")
    return [REPORT_JSON, REPORT_MD]


def document_rows(what: dict, nll: Iterable[float], tokens: Iterable[int],
                  **columns: list) -> list[dict]:
    """documents.jsonl's rows for one scored dataset: `what` (suite, dataset, ...), then each
    document's index, summed log-probability and scored token count, and its `columns` values."""
    return [{**what, "document": i, "log_prob": -float(n), "tokens": int(t),
             **{name: values[i] for name, values in columns.items()}}
            for i, (n, t) in enumerate(zip(nll, tokens, strict=True))]


def write_documents(folder: Path, rows: list[dict]) -> str:
    """documents.jsonl (the per_document option): one JSON line per scored document."""
    text = "".join(json.dumps(strict_json(row), ensure_ascii=False, allow_nan=False) + "\n"
                   for row in rows)
    (folder / DOCUMENTS_JSONL).write_text(text, encoding="utf-8")
    return DOCUMENTS_JSONL


def _read(path: str | Path) -> dict:
    path = Path(path)
    return json.loads((path / REPORT_JSON if path.is_dir() else path).read_text(encoding="utf-8"))


def compare_reports(paths: list[str | Path], labels: list[str] | None = None) -> str:
    """One Markdown table: the parameter count, then a row per metric (in order of first
    appearance), then perplexity scoring's tokens/s; a column per report (`labels`, else its
    model's name; the path where names repeat). Accuracies in %."""
    reports = [_read(p) for p in paths]
    names = labels or [r["model"]["name"] for r in reports]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    metrics: list[str] = []
    for r in reports:
        metrics += [m for m in r["metrics"] if m not in metrics]
    rows = [["parameters"] + [f"{r['model']['parameters']:,}" for r in reports]]
    rows += [[m] + [_num(m, r["metrics"].get(m)) for r in reports] for m in metrics]
    if any("ppl" in r["timing_s"] for r in reports):
        rows.append(["ppl scoring tokens/s"] + [_scoring_rate(r) for r in reports])
    lines = _table(["metric"] + names, rows) + _length_table(names, reports)
    return "\n".join(lines).rstrip() + "\n"


def by_length(report: dict) -> dict[str, dict[int, float]]:
    """The report's figures that vary with the context length, as series {name: {length:
    value}}: perplexity per dataset (token level; WikiText's per word), passkey accuracy. Only
    series with two lengths or more."""
    series: dict[str, dict[int, float]] = {}
    for r in report["records"]:
        if r["suite"] == "ppl":
            name = f"ppl {r['dataset']}"
            value, length, stride = r["ppl"], r["seq_length"], r["stride"]
        elif r["suite"] == "wikitext":
            name = f"word ppl wikitext/{r['convention']}"
            value, length, stride = r["word_ppl"], r["seq_length"], r["stride"]
        elif r["suite"] == "passkey":
            name, value, length, stride = "passkey accuracy", r["accuracy"], r["length"], None
        else:
            continue
        if stride is not None and stride != length:
            name += f" (stride {stride})"
        series.setdefault(name, {})[length] = value
    return {name: points for name, points in series.items() if len(points) > 1}


def _length_table(names: list[str], reports: list[dict]) -> list[str]:
    """A row per length, a column per model and series: the figures of `by_length`."""
    found = [by_length(r) for r in reports]
    series = list(dict.fromkeys(name for f in found for name in f))
    if not series:
        return []
    lengths = sorted({length for f in found for points in f.values() for length in points})
    header = ["length"] + [f"{n}: {s}" for s in series for n in names]
    rows = [[f"{length:,}"] + [_num(s, f.get(s, {}).get(length)) for s in series for f in found]
            for length in lengths]
    return ["", "By context length:", ""] + _table(header, rows)


def _scoring_rate(report: dict) -> str:
    """Tokens scored per second by the perplexity suite: the model's forward throughput at
    the evaluation's batch size and dtype."""
    seconds = report["timing_s"].get("ppl")
    tokens = sum(r["tokens"] for r in report["records"] if r["suite"] == "ppl")
    return f"{tokens / seconds:,.0f}" if seconds else "–"
