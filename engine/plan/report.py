"""The plan as Markdown (what `python -m engine plan` prints and the flow publishes) and as
JSON records (its `--output`, MLflow's params and metrics)."""

from __future__ import annotations

from engine.plan.estimate import Estimate
from engine.plan.memory import GIB

COLUMNS = ("parameters", "gradients", "masters", "optimizer", "gradient_sums", "activations",
           "pipeline", "buffers")


def gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def record(e: Estimate, tokens: float | None = None) -> dict:
    """One estimate as plain values: the layout fields, GiB per category, time and rate."""
    out = {**e.fields, "layout": e.describe(), "fits": e.fits,
           "memory_gib": {k: round(v / GIB, 3) for k, v in e.memory.as_dict().items()},
           "step_s": round(e.timing.step_s, 4), "tokens_per_s": round(e.tokens_per_s),
           "mfu": round(e.timing.mfu, 4), "comm_gib_per_step": round(e.timing.comm_bytes / GIB, 3),
           "time_s": {k: round(getattr(e.timing, k), 4) for k in
                      ("compute_s", "bubble_s", "tp_comm_s", "exposed_dp_s", "optimizer_s")}}
    if tokens:
        out["days"] = round(e.days(tokens), 2)
    return out


def markdown(title: str, estimates: list[Estimate], rows: int, tokens: float | None,
             gpu: str, usable_gib: float) -> str:
    """The ranked table (the first row is the recommendation), GiB per GPU by category."""
    fitting = [e for e in estimates if e.fits]
    lines = [f"## {title}", ""]
    if fitting:
        best = fitting[0]
        days = f", {best.days(tokens):.1f} days for {tokens:.3g} tokens" if tokens else ""
        lines += [f"**Recommended**: {best.describe()} — {gib(best.memory.total)} GiB per GPU "
                  f"of {usable_gib:.1f} usable on {gpu}, {best.timing.step_s:.3f} s a step, "
                  f"{best.tokens_per_s:,.0f} tokens/s, MFU {100 * best.timing.mfu:.1f}%{days}.",
                  ""]
    else:
        lines += [f"**No layout fits** {usable_gib:.1f} GiB per GPU on {gpu}.", ""]
    lines += [f"{len(fitting)} of {len(estimates)} layouts fit; the first {rows} by speed, "
              "those that fit first (GiB per GPU, its most loaded rank):", "",
              "| layout | fits | " + " | ".join(COLUMNS) + " | total | step s | tokens/s | MFU |"
              + (" days |" if tokens else ""),
              "|---" * (len(COLUMNS) + 7 + bool(tokens)) + "|"]
    for e in estimates[:rows]:
        m = e.memory.as_dict()
        cells = [e.describe(), "yes" if e.fits else "**no**", *(gib(m[c]) for c in COLUMNS),
                 gib(e.memory.total), f"{e.timing.step_s:.3f}", f"{e.tokens_per_s:,.0f}",
                 f"{100 * e.timing.mfu:.1f}%"] + ([f"{e.days(tokens):.1f}"] if tokens else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
