"""The loss curve of a training stage as a PNG for its MLflow run. matplotlib's object API with
the Agg canvas: no pyplot global state, safe beside other tasks' threads, no display needed."""

from __future__ import annotations

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

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
