"""`psft-lite plot`: training curves of one or more runs, overlaid — the paper's entropy figure for your own runs.

Uses matplotlib (the `plot` extra: pip install 'psft-lite[plot]'), imported only here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from psft_lite.core.errors import DataError
from psft_lite.core.extras import require_extra
from psft_lite.core.rundir import metrics_file, recipe_file
from psft_lite.tracking.metrics import read_metrics
from psft_lite.training.objectives import OBJECTIVES, method_name

#: (metrics key, panel title); a panel is drawn when any run has the key. Objective statistics come from the table.
PANELS = [
    ("loss", "objective loss"),
    ("nll", "NLL of the targets"),
    ("entropy", "entropy on trained tokens"),
    *[panel for spec in OBJECTIVES.values() for panel in spec.panels],
    ("eval_accuracy", "eval accuracy"),
    ("eval_loss", "eval NLL"),
]


def run_label(run_dir: Path) -> str:
    """The run's folder name plus its objective, e.g. `sft-run (sft)`."""
    from psft_lite.recipe.schema import load_recipe

    try:
        recipe = load_recipe(recipe_file(run_dir))
        return f"{run_dir.name} ({method_name(recipe.objective)})"
    except Exception:  # a label is cosmetic; an unreadable recipe must not stop the plot
        return run_dir.name


def load_series(run_dir: Path) -> tuple[dict[str, tuple[list[float], list[float]]], list[dict[str, Any]]]:
    """Per key: (steps, values) from metrics.jsonl (training steps and eval events), and the event records."""
    path = metrics_file(run_dir)
    if not path.is_file():
        raise DataError(f"{run_dir}: no metrics.jsonl; pass run directories written by `psft-lite train`.")
    series: dict[str, tuple[list[float], list[float]]] = {}
    events = []
    for rec in read_metrics(path):
        if "event" in rec and rec["event"] != "eval":
            events.append(rec)
            continue
        for key, _ in PANELS:
            v = rec.get(key)
            if isinstance(v, (int, float)):
                xs, ys = series.setdefault(key, ([], []))
                xs.append(rec["step"])
                ys.append(v)
    return series, events


def pyplot(what: str) -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or one paragraph saying how to install it."""
    require_extra("matplotlib", f"{what} draws with matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_runs(run_dirs: list[Path], out: Path, smooth: int = 1) -> dict[str, Any]:
    """Write one PNG with a panel per metric; returns which series (and colours) were drawn per run."""
    plt = pyplot("psft-lite plot")
    runs = [(run_label(d), *load_series(d)) for d in run_dirs]
    keys = [(k, title) for k, title in PANELS if any(k in s for _, s, _ in runs)]
    if not keys:
        raise DataError("none of the runs has metrics to plot (empty metrics.jsonl?).")
    cols = min(3, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False)
    drawn: dict[str, list[str]] = {}
    colors: dict[str, set[str]] = {}
    for ax, (key, title) in zip(axes.flat, keys):
        for i, (label, series, events) in enumerate(runs):
            if key not in series:
                continue
            xs, ys = series[key]
            ys = _smooth(ys, smooth) if key not in ("eval_accuracy", "eval_loss") else ys
            (line,) = ax.plot(
                xs,
                ys,
                label=label,
                color=f"C{i % 10}",  # one colour per run in every panel
                marker="o" if key.startswith("eval") else None,
                markersize=3,
            )
            for ev in events:  # guard-rail and skipped-step events as markers on the run's curve
                ax.axvline(ev.get("step", 0), color=line.get_color(), alpha=0.3, linestyle=":")
            drawn.setdefault(label, []).append(key)
            colors.setdefault(label, set()).add(line.get_color())
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in axes.flat:
        h, lab = ax.get_legend_handles_labels()
        if len(lab) > len(labels):
            handles, labels = h, lab
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.06 if rows > 1 else 0.1, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return {"out": str(out), "series": drawn, "colors": {k: sorted(v) for k, v in colors.items()}}


def _smooth(ys: list[float], k: int) -> list[float]:
    """Trailing moving average over k points (k = 1: raw)."""
    if k <= 1:
        return ys
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= k:
            acc -= ys[i - k]
        out.append(acc / min(i + 1, k))
    return out
