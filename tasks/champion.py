"""The champion of a registered model: the version the alias `champion` names, replaced only by
a candidate that beats it on a chosen metric by a set margin. A promoted version gets the alias
and a tag saying why; a rejected one stays registered with the tag `rejected` and the reason.
Each night's outcome is appended to a history kept beside the watermark
(`$LMFORGE_HOME/nightly/<name>/history.jsonl`), drawn as the champions' metric over nights, and
a promotion is announced as a Prefect event (`lmforge.champion.promoted`) that automations can
act on (docs/orchestration.md)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.logging import get_run_logger

from tasks.comparison import publish_figure
from tasks.models import SCHEME, NotRegistered, pin
from tasks.tracking import client
from tasks.watermark import nightly_dir

ALIAS = "champion"
HISTORY = "history.jsonl"
HISTORY_CHART = "champion_history.png"
LOWER_IS_BETTER = ("ppl", "loss", "nll", "bits_per_byte")


@dataclass(frozen=True)
class Verdict:
    metric: str
    candidate: float
    champion: float | None      # None: no champion yet, the candidate's parent was measured
    promote: bool
    reason: str
    figures: dict[str, dict[str, float]]  # "candidate", "champion": every metric of each


def current_champion(name: str) -> str | None:
    """`models:/NAME/VERSION` of the champion now; None when `name` has none (yet)."""
    try:
        return pin(f"{SCHEME}{name}@{ALIAS}")
    except NotRegistered:
        return None


def chosen_metric(metrics: dict[str, float], metric: str) -> str:
    """`metric` itself, or the first metric whose name starts with it ("ppl/")."""
    if metric in metrics:
        return metric
    found = [name for name in metrics if name.startswith(metric)]
    if not found:
        raise ValueError(f"promotion metric {metric!r} is not among the evaluation's metrics "
                         f"({', '.join(metrics) or 'none'})")
    return found[0]


def judge(candidate: dict[str, float], champion: dict[str, float], metric: str,
          min_improvement: float, higher_is_better: bool | None) -> Verdict:
    """Does the candidate beat the champion on `metric` by at least `min_improvement` (a
    fraction of the champion's value)?"""
    name = chosen_metric(candidate, metric)
    if higher_is_better is None:
        higher_is_better = not any(word in name for word in LOWER_IS_BETTER)
    new, old = float(candidate[name]), float(champion[name])
    gain = (new - old if higher_is_better else old - new) / (abs(old) or 1.0)  # 0% accuracy
    promote = gain >= min_improvement
    reason = (f"{name} {new:.4g} vs {old:.4g}: {100 * gain:+.2f}% "
              f"({'≥' if promote else '<'} the {100 * min_improvement:.2f}% required)")
    return Verdict(name, new, old, promote, reason,
                   {"candidate": dict(candidate), "champion": dict(champion)})


@task(name="decide-champion", cache_policy=NO_CACHE)
async def settle(name: str, candidate: str, verdict: Verdict, night: dict) -> None:
    """Promote the candidate version (`models:/NAME/VERSION`) or mark it rejected; append the
    night to the history; announce a promotion."""
    version = candidate.rsplit("/", 1)[1]
    mlflow = client()
    if verdict.promote:
        await asyncio.to_thread(mlflow.set_registered_model_alias, name, ALIAS, version)
        await asyncio.to_thread(mlflow.set_model_version_tag, name, version, "lmforge.promoted",
                                verdict.reason)
        emit_event(event="lmforge.champion.promoted",
                   resource={"prefect.resource.id": f"lmforge.model.{name}",
                             "lmforge.version": version},
                   payload={"reason": verdict.reason, **night})
    else:
        await asyncio.to_thread(mlflow.set_model_version_tag, name, version, "rejected",
                                verdict.reason)
    get_run_logger().info("%s %s: %s", "promoted" if verdict.promote else "rejected", candidate,
                          verdict.reason)
    append_history(name, {"time": time.time(), "candidate": candidate, **asdict(verdict),
                          **night})


def append_history(name: str, record: dict) -> None:
    folder = nightly_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / HISTORY, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def history(name: str) -> list[dict]:
    file = nightly_dir(name) / HISTORY
    return [json.loads(line) for line in file.read_text().splitlines()] if file.is_file() else []


def history_chart(records: list[dict]) -> Figure | None:
    """Each night's candidate (promoted or rejected) and the champion it was measured against:
    a panel for the promotion metric and one for each FinEval accuracy measured; None before
    the first night."""
    if not records:
        return None
    last = records[-1]
    names = [last["metric"]] + sorted(m for m in last["figures"]["candidate"]
                                      if m.startswith("fineval/") and m.endswith("/accuracy"))
    fig = Figure(figsize=(6, 3 * len(names)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(len(names), 1, i + 1)
        nights = [(n, r) for n, r in enumerate(records, 1) if name in r["figures"]["candidate"]]
        ax.plot([n for n, _ in nights], [r["figures"]["champion"][name] for _, r in nights],
                marker="s", color="grey", label="champion before the night")
        for promoted, colour, label in ((True, "tab:green", "promoted"),
                                        (False, "tab:red", "rejected")):
            points = [(n, r["figures"]["candidate"][name]) for n, r in nights
                      if r["promote"] == promoted]
            if points:
                ax.scatter(*zip(*points), color=colour, zorder=3, label=label)
        ax.set_xticks([n for n, _ in nights])
        ax.set_xlabel("night")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


async def publish_history(name: str, parent: str | None) -> None:
    """The nights so far as a chart in the MLflow run `parent` and a Prefect image artifact."""
    chart = history_chart(history(name))
    if chart is not None and parent is not None:
        await publish_figure(parent, chart, HISTORY_CHART, "champion-history",
                             f"{name}: nights so far")
