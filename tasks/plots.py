"""Figures for MLflow runs: a training stage's loss curve, evaluations side by side, and their
figures against the context length. matplotlib's object API with the Agg canvas: no pyplot
global state, safe beside other tasks' threads, no display needed."""

from __future__ import annotations

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from engine.evaluate.report import by_length

CURVES = ("loss", "valid_loss")


def loss_curve(series: dict[str, dict[int, tuple[float, int]]], title: str) -> Figure | None:
    """Training and validation loss against the step; None when the stage logged neither."""
    curves = [key for key in CURVES if series.get(key)]
    if not curves:
        return None
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key in curves:
        steps = sorted(series[key])
        ax.plot(steps, [series[key][s][0] for s in steps], marker="." if len(steps) < 30 else None,
                label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def comparison_chart(names: list[str], reports: list[dict], most: int = 12) -> Figure | None:
    """One small bar chart per metric (the first `most` metrics), a bar per model: evaluation
    reports side by side, for the MLflow run of a comparison."""
    metrics: list[str] = []
    for report in reports:
        metrics += [m for m, v in report["metrics"].items()
                    if m not in metrics and isinstance(v, (int, float))]
    metrics = metrics[:most]
    if not metrics:
        return None
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig = Figure(figsize=(4 * cols, 3 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, i + 1)
        values = [r["metrics"].get(metric) for r in reports]
        ax.bar(range(len(names)), [v if isinstance(v, (int, float)) else 0 for v in values])
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    return fig


def length_chart(names: list[str], reports: list[dict]) -> Figure | None:
    """A panel per figure that varies with the context length (perplexity per dataset, passkey
    accuracy), a line per model against the length; None when no report has such a figure."""
    found = [by_length(r) for r in reports]
    series = list(dict.fromkeys(name for f in found for name in f))
    if not series:
        return None
    fig = Figure(figsize=(5 * len(series), 3.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for i, name in enumerate(series):
        ax = fig.add_subplot(1, len(series), i + 1)
        for label, points in zip(names, found):
            if name in points:
                lengths = sorted(points[name])
                ax.plot(lengths, [points[name][n] for n in lengths], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ticks = sorted({n for points in found for n in points.get(name, {})})
        ax.set_xticks(ticks, [f"{n:,}" for n in ticks])
        ax.minorticks_off()
        ax.set_xlabel("context length (tokens)")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig
