"""Loss curves of several runs against tokens and against FLOPs (`stackfast plot`).

FLOPs are the runs' own counts from metrics.jsonl, which include a grown run's small-model
phase. The growth step is marked. The speedup annotation compares each run with the
first (the baseline, usually scratch): sp = FLOPs_baseline / FLOPs_run - 1, where
FLOPs_run is the FLOPs at which the run's validation curve first reaches the baseline's
final validation loss (linear interpolation between evaluations).
"""
from __future__ import annotations

from pathlib import Path

from stackfast.config import StackfastError
from stackfast.metrics import read_metrics


def val_curve(rows: list[dict]) -> list[tuple[float, float, float]]:
    """(tokens, flops, val_loss) of every validation row."""
    return [(r["tokens"], r["flops"], r["val_loss"]) for r in rows if "val_loss" in r]


def flops_to_reach(curve: list[tuple[float, float, float]], target: float) -> float | None:
    """FLOPs at which a validation curve first reaches `target` loss (None: never)."""
    previous = None
    for _, flops, loss in curve:
        if loss <= target:
            if previous is None or previous[1] == loss:
                return flops
            f0, l0 = previous
            return f0 + (l0 - target) / (l0 - loss) * (flops - f0)
        previous = (flops, loss)
    return None


def speedup_vs(baseline: list, curve: list) -> float | None:
    """sp = FLOPs_baseline / FLOPs_run - 1 at the baseline's final loss (None: not reached)."""
    flops = flops_to_reach(curve, baseline[-1][2])
    return baseline[-1][1] / flops - 1.0 if flops else None


def plot_runs(run_dirs: list[str | Path], out: str | Path, labels: list[str] | None = None,
              title: str = "", note: str = "", annotate_speedup: bool = True,
              colors: list[str] | None = None) -> Path:
    """Draw validation loss vs tokens and vs FLOPs for the runs; write a PNG to `out`.

    `colors` (one matplotlib color per run) lets runs share a color, e.g. the seeds of one
    configuration; by default every run gets its own.

    With annotate_speedup, each label gets its curve's speedup over the first run. That reads
    the run's curve mid-schedule; a comparison by complete schedules (the demo's) passes its
    own verdict as `note` instead."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise StackfastError("plotting needs matplotlib (pip install 'stackfast[bench]')") from None
    from matplotlib.backend_bases import FigureCanvasBase
    formats = FigureCanvasBase.get_supported_filetypes()
    if Path(out).suffix.lstrip(".").lower() not in formats:  # checked before any run is read
        raise StackfastError(f"--out {out}: not an image file name; use one of {', '.join('.' + f for f in formats)}")
    if colors and len(colors) != len(run_dirs):
        raise StackfastError(f"{len(colors)} colors for {len(run_dirs)} runs: one per run, in order")
    if labels and len(labels) != len(run_dirs):  # zip() would drop the runs without one
        raise StackfastError(f"--label given {len(labels)} times for {len(run_dirs)} runs: one per run, in order")
    labels = labels or [Path(d).name for d in run_dirs]
    runs = []
    for d in run_dirs:
        path = Path(d) / "metrics.jsonl"
        if not path.is_file():
            raise StackfastError(f"{d}: not a run folder (no metrics.jsonl)")
        rows = read_metrics(d)
        if not val_curve(rows):
            raise StackfastError(f"{d}: no validation rows to plot")
        runs.append(rows)
    fig, (ax_tokens, ax_flops) = plt.subplots(1, 2, figsize=(12, 4.5))
    baseline = val_curve(runs[0])
    for i, (rows, label) in enumerate(zip(runs, labels)):
        curve = val_curve(rows)
        sp = speedup_vs(baseline, curve) if annotate_speedup and rows is not runs[0] else None
        suffix = f" (speedup {100 * sp:+.0f}% on its curve)" if sp is not None else ""
        line, = ax_tokens.plot([c[0] for c in curve], [c[2] for c in curve], marker=".", label=label,
                               color=colors[i] if colors else None)
        ax_flops.plot([c[1] for c in curve], [c[2] for c in curve], marker=".", color=line.get_color(),
                      label=label + suffix)
        for event in (r for r in rows if r.get("event") == "growth"):
            ax_tokens.axvline(event["tokens"], color=line.get_color(), linestyle=":", alpha=0.7)
            ax_flops.axvline(event["flops"], color=line.get_color(), linestyle=":", alpha=0.7)
    ax_flops.axhline(baseline[-1][2], color="grey", linewidth=0.8, linestyle="--")
    ax_tokens.set_xlabel("tokens")
    ax_flops.set_xlabel("FLOPs (including the small model's)")
    for ax in (ax_tokens, ax_flops):
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
    ax_flops.legend(fontsize=8)
    fig.suptitle(title or "validation loss (dotted: growth step; dashed: baseline's final loss)")
    if note:
        fig.text(0.5, 0.005, note, ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
