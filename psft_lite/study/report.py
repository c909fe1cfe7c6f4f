"""The forgetting benchmark's report (docs/study.md): every evaluated checkpoint, comparisons at matched learning, and
figures, generated from a study folder's committed records alone, so every figure can be regenerated and checked.

A (method, seed) run is evaluated at measured steps (25, 50 and each epoch end); every point carries, per item, what
was learned (in-domain accuracy in the taught format; the transfer set) and what the model can still do (the
general-ability suite, compared item by item with the base model's answers). Forgetting is the *behavioural* change
first — the suite's accuracy change against the base, in points — and the KL to the base second (it is what sft_kl's
penalty minimises, so it cannot be the yardstick sft_kl is judged by).

The records, the curves and the statistics are psft_lite.study.curves; the rule that reads a default off them
is psft_lite.study.verdicts.

    python -m psft_lite.study.report docs/study/forgetting --doc docs/study.md --figures docs/study  # make study-report
    python -m psft_lite.study.report docs/study/forgetting/units/U --collect RUNS/U --only-collect  # a unit's records
"""

from __future__ import annotations

import argparse
import gzip
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from psft_lite.core import rundir
from psft_lite.core.files import atomic_write_text
from psft_lite.core.stats import LEVEL, clopper_pearson
from psft_lite.study import verdicts
from psft_lite.study.blocks import splice
from psft_lite.study.curves import (
    MEASURES,
    Curve,
    at_level,
    bits_of,
    build_curves,
    change,
    difference,
    kl_at,
    label_of,
    level,
    levels,
    read_jsonl,
    read_records,
    seed_differences,
)
from psft_lite.study.methods import METHODS, PROBE, Cell
from psft_lite.study.plot import pyplot
from psft_lite.tracking.metrics import read_metrics

# ---------------------------------------------------------------------------------------------------------------------
# Tables


def _train(c: Curve, name: str, j: int) -> str:
    v = c.train[name][:, j]
    v = v[~np.isnan(v)]
    return f"{v.mean():.3f}" if len(v) else "—"


def _r2w(c: Curve, j: int) -> str:
    """Mean right→wrong / wrong→right counts of the suite over the seeds at point j."""
    g = c.bits["general"]
    pairs = [(((g[s, 0] == 1) & (g[s, j] == 0)).sum(), ((g[s, 0] == 0) & (g[s, j] == 1)).sum()) for s in c.present(j)]
    if not pairs:
        return "—"
    fmt = "{:.0f}" if len(pairs) == 1 else "{:.1f}"  # one seed: the counts themselves
    return f"{fmt.format(np.mean([a for a, _ in pairs]))} / {fmt.format(np.mean([b for _, b in pairs]))}"


def checkpoint_table(curves: list[Curve], base: dict[str, Any]) -> str:
    head = (
        "| method | step (epoch) | seeds | in-domain % | format used % | transfer % | general ability, change "
        "(points) | right→wrong / wrong→right | taught format in general replies % | KL to base (secondary) | "
        "train entropy | clip fraction |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    c0 = curves[0]
    cells = [f"{level(c0, k, 0).mean:.1f}" for k in ("acc", "format", "transfer")]
    lines.append(
        f"| base | 0 | — | {' | '.join(cells)} | {level(c0, 'general', 0).mean:.1f} % | — | "
        f"{level(c0, 'leak', 0).mean:.1f} | 0 | — | — |"
        if "leak" in c0.bits
        else f"| base | 0 | — | {' | '.join(cells)} | {level(c0, 'general', 0).mean:.1f} % | — | — | 0 | — | — |"
    )
    for c in curves:
        for j in range(1, len(c.steps)):
            cells = [level(c, k, j).fmt() for k in ("acc", "format", "transfer")]
            lines.append(
                f"| {c.label} | {c.steps[j]} ({c.epochs[j]:g}) | {len(c.present(j))} | {' | '.join(cells)} | "
                f"{change(c, 'general', j).fmt(signed=True)} | {_r2w(c, j)} | {_leak(c, j)} | {kl_at(c, j).fmt(3)} | "
                f"{_train(c, 'train_entropy', j)} | {_train(c, 'clip_frac', j)} |"
            )
    return "\n".join(lines)


def _leak(c: Curve, j: int) -> str:
    return level(c, "leak", j).fmt() if "leak" in c.bits else "—"


def matched_table(curves: list[Curve], ref: str, lv: list[float], read: str = "general") -> str:
    name = MEASURES[read][2].replace(" %", "")
    lines = [
        f"| in-domain % reached | method | {name} change there (points) | difference to {ref} | seeds reaching | "
        "between steps |",
        "|---|---|---|---|---|---|",
    ]
    refc = next((c for c in curves if c.label == ref), None)
    for lvl in lv:
        for c in curves:
            m = at_level(c, "acc", lvl, read)
            d = at_level(c, "acc", lvl, read, refc) if refc is not None and c is not refc else None
            diff = (
                "—"
                if d is None or not d.reached
                else d.estimate.fmt(signed=True) + (" *" if d.estimate.excludes_zero else "")
            )
            value = m.estimate.fmt(signed=True) if m.reached else "not reached"
            brackets = ", ".join(f"{a}–{b}" for a, b in sorted(m.brackets)) or "—"
            lines.append(f"| {lvl:.0f} | {c.label} | {value} | {diff} | {m.reached} of {m.of} | {brackets} |")
    return "\n".join(lines)


def _end_difference(c: Curve, ref: Curve, key: str) -> str:
    """c's last checkpoint minus ref's on `key`, paired by seed and item, starred when the interval excludes 0."""
    if key not in c.bits or key not in ref.bits:
        return "—"
    e = difference(c, ref, key, len(c.steps) - 1, len(ref.steps) - 1)
    return e.fmt(signed=True) + (" *" if e.seeds and e.excludes_zero else "")


def _end_by_seed(c: Curve, ref: Curve, key: str = "general") -> str:
    if key not in c.bits or key not in ref.bits:
        return "—"
    per_seed = seed_differences(c, ref, key, len(c.steps) - 1, len(ref.steps) - 1)
    return ", ".join(f"s{s} {mean:+.1f}" for s, (mean, _) in per_seed.items()) or "—"


def end_table(curves: list[Curve], ref: str) -> str:
    """Each method's last checkpoint against `ref`'s, paired by seed and item, with the general-ability difference of
    every seed: what a user who trains for the whole budget gets. The rule reads the matched level instead, since a
    method that learns less by the end can keep more for that reason alone."""
    refc = next((c for c in curves if c.label == ref), None)
    if refc is None:
        return ""
    lines = [
        f"| method | seeds paired with {ref} | step (its / {ref}'s) | in-domain, minus {ref} | general ability, "
        f"minus {ref} | by seed | taught format in general replies, minus {ref} | transfer, minus {ref} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in curves:
        if c is refc:
            continue
        d = {key: _end_difference(c, refc, key) for key in ("acc", "general", "leak", "transfer")}
        lines.append(
            f"| {c.label} | {len([s for s in c.seeds if s in refc.seeds])} | {c.steps[-1]} / {refc.steps[-1]} | "
            f"{d['acc']} | {d['general']} | {_end_by_seed(c, refc)} | {d['leak']} | {d['transfer']} |"
        )
    return "\n".join(lines)


def base_only_markdown(base: dict[str, Any]) -> str:
    """The block while only the base model's evaluation is committed: its own scores."""
    cells = []
    for key in ("acc", "format", "transfer", "general"):
        b = bits_of(base, key)
        cells.append("—" if b is None else f"{100 * b.mean():.1f} ({len(b)} items)")
    return (
        "Generated by `make study-report` from the committed records. Only the base model's evaluation is committed "
        "so far; no method's unit is.\n\n| model | in-domain % | format used % | transfer % | general ability % |\n"
        f"|---|---|---|---|---|\n| base | {' | '.join(cells)} |\n"
    )


def report_markdown(curves: list[Curve], base: dict[str, Any], ref: str = "sft") -> str:
    if not curves:
        return base_only_markdown(base)
    seeds = sorted({s for c in curves for s in c.seeds})
    n = {k: curves[0].bits[k].shape[2] for k in MEASURES if k in curves[0].bits}
    n_kl = curves[0].kl.shape[2] if curves[0].kl is not None else 0
    parts = [
        f"Generated by `make study-report` from the committed records (seeds present: {seeds}; items: in-domain "
        f"{n.get('acc', 0)}, transfer {n.get('transfer', 0)}, general-ability suite {n.get('general', 0):,}, KL on "
        f"the base's answers to {n_kl} prompts). Brackets: {LEVEL:.0%} intervals — within each seed the standard "
        "error over items (paired by item for a change against the base or a difference between methods), across "
        "seeds a t-interval on the seed means (one seed: the within-seed normal interval). The point is the mean "
        "of the seeds' observed values."
        + (
            f' "Taught format in general replies": of the suite\'s {n["leak"]} generated replies, the share that '
            "writes the taught answer format's opening (counted from the committed replies); the suite's verifiers "
            "judge whether a reply names the right answer, so these replies can still count as right."
            if "leak" in n
            else ""
        ),
        "",
        "#### Every evaluated checkpoint",
        "",
        "Train entropy and clip fraction: means over the training steps since the previous checkpoint (the clip "
        "fraction, psft only: the share of trained tokens whose ratio to the old policy was clipped).",
        "",
        checkpoint_table(curves, base),
    ]
    lv = levels(curves)
    if lv:
        parts += [
            "",
            "#### At matched in-domain accuracy: what the model can still do (general ability change against the "
            "base; higher is better)",
            "",
            matched_table(curves, ref, lv),
            "",
            "#### At matched in-domain accuracy: transfer (change against the base, points)",
            "",
            matched_table(curves, ref, lv, "transfer"),
        ]
        if all("leak" in c.bits for c in curves):
            parts += [
                "",
                "#### At matched in-domain accuracy: the taught format in general replies (change against the base, "
                "points; lower is better)",
                "",
                matched_table(curves, ref, lv, "leak"),
            ]
    rs = verdicts.rows(curves, ref)
    if rs:
        parts += [
            "",
            f'#### Against {ref}, as the default\'s rule reads it ("How the default is chosen")',
            "",
            f"Paired by seed and item. In-domain at the end: each method's last checkpoint against {ref}'s. The other "
            f"differences are read at the highest in-domain level (a multiple of 10 %) that every paired seed of the "
            f"method and of {ref} reaches; better or worse when the interval excludes 0.",
            "",
            verdicts.table(rs, ref),
            "",
            f"#### At the end of the budget, against {ref} (the rule does not read this)",
            "",
            f"Each method's last checkpoint against {ref}'s, paired by seed and item: what training for the whole "
            "budget gives. Read it with the in-domain column: a method that has learned less by the end can keep "
            "more general ability for that reason alone, which is why the rule compares at a matched in-domain level.",
            "",
            end_table(curves, ref),
        ]
    parts += [
        "",
        '`*`: the interval of the difference excludes 0. "between steps": the measured checkpoints that bracket the '
        "level in the seeds that reach it (0 is the base).",
    ]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# Figures


def plot_report(curves: list[Curve], out_dir: Path, name: str = "") -> list[Path]:
    """benchmark-tradeoff.png (in-domain accuracy against the general-ability change, every checkpoint a point with
    its intervals) and benchmark-steps.png (in-domain, transfer and general ability against the step)."""
    plt = pyplot("the benchmark report's figures")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"benchmark-{name}" if name else "benchmark"
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.6))
    for i, c in enumerate(curves):
        xs = [change(c, "general", j) for j in range(len(c.steps))]
        ys = [level(c, "acc", j) for j in range(len(c.steps))]
        x = np.array([e.mean for e in xs])
        y = np.array([e.mean for e in ys])
        xerr = np.abs(np.array([[e.low, e.high] for e in xs]).T - x)
        yerr = np.abs(np.array([[e.low, e.high] for e in ys]).T - y)
        ax.errorbar(
            x,
            y,
            xerr=np.nan_to_num(xerr),
            yerr=np.nan_to_num(yerr),
            marker="o",
            ms=3,
            lw=1.2,
            capsize=2,
            color=f"C{i}",
            label=c.label,
        )
    ax.axvline(0, color="gray", lw=0.8)
    ax.set_xlabel("general ability, change against the base (points; forgetting goes left)")
    ax.set_ylabel("in-domain accuracy (%)")
    ax.set_title("learning vs forgetting (each point a measured checkpoint; base at 0, 0)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    paths.append(out_dir / f"{stem}-tradeoff.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    keys = [("acc", level), ("transfer", change), ("general", change)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for i, c in enumerate(curves):
        for ax, (key, fn) in zip(axes, keys):
            es = [fn(c, key, j) for j in range(len(c.steps))]
            y = np.array([e.mean for e in es])
            err = np.abs(np.array([[e.low, e.high] for e in es]).T - y)
            ax.errorbar(
                c.steps, y, yerr=np.nan_to_num(err), marker="o", ms=3, lw=1.2, capsize=2, color=f"C{i}", label=c.label
            )
    titles = [
        "in-domain accuracy (%)",
        "transfer, change against the base (points)",
        "general ability, change against the base (points)",
    ]
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step (0 = base)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    paths.append(out_dir / f"{stem}-steps.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# Entry point


def generate(folder: Path, ref: str = "sft") -> tuple[list[Curve], str]:
    """(curves, markdown) of a study folder."""
    records = read_records(folder)
    curves, base = build_curves(records)
    order = {lab: i for i, lab in enumerate(dict.fromkeys(label_of(r) for r in records))}
    curves.sort(key=lambda c: (c.label != ref, order.get(c.label, 0), c.label))
    return curves, report_markdown(curves, base, ref) + calibration_table(folder) + compute_line(folder)


def compute_line(folder: Path) -> str:
    """What the committed units cost, from each unit's `seconds` (its wall time on one core): the plan's actual."""
    times = {p.parent.name: float(p.read_text()) for p in sorted(folder.glob("units/*/seconds"))}
    if not times:
        return ""
    each = ", ".join(f"{name} {t / 3600:.1f}" for name, t in times.items())
    units = f"{len(times)} committed unit{'s' if len(times) > 1 else ''}"
    return (
        f"\nCompute of the {units}: {sum(times.values()) / 3600:.1f} core-hours ({each}): the wall time of each "
        "unit's command on one core, from its `seconds` file (every attempt of a unit stopped and resumed, to the "
        "minute; a unit committed before 2026-12-07 that was resumed records only its last attempt).\n"
    )


def calibration_table(folder: Path) -> str:
    """The base model's accuracy on each kind of the general-ability suite it was scored on, against chance (from the
    base's committed answers): a kind at chance can only show noise, so a reader weighs its changes accordingly."""
    from psft_lite.inference.retention import load_suite

    name = "base-step0.jsonl.gz"  # a study's base record: in its base unit, or beside its results
    path = next((p for p in (folder / "units" / "base" / "evals" / name, folder / "evals" / name) if p.exists()), None)
    if path is None:
        return ""
    rows = next((d["rows"] for d in read_jsonl(path) if d["set"] == "general"), [])
    if not rows:
        return ""
    items = {it.id: it for it in load_suite()}
    lines = [
        "",
        "#### The base model on each kind of the general-ability suite",
        "",
        f"Accuracy with a {LEVEL:.0%} Clopper–Pearson interval, against chance (multiple choice: one over the number "
        "of options; generated replies: 0).",
        "",
        "| kind | scored by | items | base accuracy % | chance % |",
        "|---|---|---|---|---|",
    ]
    for kind in dict.fromkeys(r["kind"] for r in rows):
        right = [bool(r["right"]) for r in rows if r["kind"] == kind]
        chance = statistics.fmean(items[r["id"]].chance for r in rows if r["kind"] == kind and r["id"] in items)
        lo, hi = clopper_pearson(sum(right), len(right))
        score = "log-likelihood of each option" if chance else "a generated reply, verified"
        lines.append(
            f"| {kind} | {score} | {len(right)} | {100 * sum(right) / len(right):.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
            f" | {100 * chance:.0f} |"
        )
    return "\n".join(lines) + "\n"


def collect(src: Path, dest: Path) -> list[Path]:
    """Copy a study folder's records into `dest` for committing: results.jsonl, every evaluation's answers
    (evals/*.jsonl.gz) and each run's per-step metrics gzipped (no weights)."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    written = [Path(shutil.copyfile(src / "results.jsonl", dest / "results.jsonl"))]
    for details in sorted(src.glob("evals/*.jsonl.gz")):
        (dest / "evals").mkdir(exist_ok=True)
        written.append(Path(shutil.copyfile(details, dest / "evals" / details.name)))
    for metrics in sorted(src.glob("*/metrics.jsonl")):
        out = dest / "runs" / metrics.parent.name / "metrics.jsonl.gz"
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(metrics, "rb") as f, gzip.GzipFile(out, "wb", mtime=0) as g:
            shutil.copyfileobj(f, g)
        written.append(out)
    return written


# ---------------------------------------------------------------------------------------------------------------------
# Quick tables and figures of a study folder (`psft-lite study`: one table per evaluated epoch, or per sweep cell)


def _cell(values: list[float], pct: bool) -> str:
    if not values:
        return "—"
    scale = 100 if pct else 1
    m = statistics.mean(values) * scale
    if len(values) == 1:
        return f"{m:.1f}" if pct else f"{m:.3f}"
    spread = (max(values) - min(values)) * scale / 2
    return f"{m:.1f} ± {spread:.1f}" if pct else f"{m:.3f} ± {spread:.3f}"


def _runs(results: list[dict[str, Any]]) -> list[tuple[str, Cell]]:
    """The (method, cell) pairs in the results, in table order (method order, then the sweep's order)."""
    pairs = {(rec["method"], Cell(tuple(rec.get("cell", {}).items()))) for rec in results if rec["method"] != "base"}
    order = list(METHODS)
    return sorted(pairs, key=lambda mc: (order.index(mc[0]), [_sortable(v) for _, v in mc[1].values]))


def _sortable(v: Any) -> tuple[int, Any]:
    return (0, v) if isinstance(v, (int, float)) else (1, str(v))


def report_tables(results: list[dict[str, Any]], sets: list[str]) -> str:
    """Markdown tables, mean ± half-range over seeds: one per epoch end, or for a sweep one row per (method, cell) at
    its final epoch plus the entropy trajectory of each."""
    if any(rec.get("cell_label") for rec in results):
        return sweep_tables(results, sets)
    epochs = sorted({rec["epoch"] for rec in results if rec["method"] != "base"})
    methods = ["base"] + [m for m in METHODS if any(rec["method"] == m for rec in results)]
    cols = [f"{s} acc %" for s in sets] + ["train entropy", f"{PROBE} NLL", f"{PROBE} KL to base"]
    out = []
    for epoch in epochs:
        out.append(f"#### Epoch {epoch}\n\n| method | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
        for m in methods:
            rows = [rec for rec in results if rec["method"] == m and (rec["epoch"] == epoch or m == "base")]
            if not rows:
                continue
            cells = [_cell([rec[s]["accuracy"] for rec in rows if "accuracy" in rec.get(s, {})], True) for s in sets]
            cells.append(_cell([rec["train_entropy"] for rec in rows if rec.get("train_entropy") is not None], False))
            cells.append(_cell([rec[PROBE]["mean_nll"] for rec in rows if PROBE in rec], False))
            cells.append(_cell([rec[PROBE].get("kl_to_base", 0.0) for rec in rows if PROBE in rec], False))
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def sweep_tables(results: list[dict[str, Any]], sets: list[str]) -> str:
    first = sets[0]
    cols = [f"{s} acc %" for s in sets] + [
        f"{first} gen. entropy",
        "train NLL",
        "train entropy",
        "clip frac",
        f"{PROBE} NLL",
        f"{PROBE} KL to base",
    ]
    out = [
        "#### Final epoch of each run\n",
        "| method | cell | epoch | " + " | ".join(cols) + " |",
        "|---|---|---|" + "---|" * len(cols),
    ]
    traj = [
        "#### Entropy (and NLL) on trained tokens at each evaluated epoch\n",
        "| method | cell | epoch: entropy (NLL) |",
        "|---|---|---|",
    ]
    for method, cell in [("base", Cell()), *_runs(results)]:
        mine = [rec for rec in results if rec["method"] == method and rec.get("cell_label", "") == cell.label]
        if not mine:
            continue
        last = max(rec["epoch"] for rec in mine)
        rows = [rec for rec in mine if rec["epoch"] == last]
        cells = [_cell([rec[s]["accuracy"] for rec in rows if "accuracy" in rec.get(s, {})], True) for s in sets]
        cells.append(_cell([rec[first]["mean_entropy"] for rec in rows if first in rec], False))
        for key in ("train_nll", "train_entropy", "clip_frac"):
            cells.append(_cell([rec[key] for rec in rows if rec.get(key) is not None], False))
        cells.append(_cell([rec[PROBE]["mean_nll"] for rec in rows if PROBE in rec], False))
        cells.append(_cell([rec[PROBE].get("kl_to_base", 0.0) for rec in rows if PROBE in rec], False))
        out.append(f"| {method} | {cell.label or '—'} | {last} | " + " | ".join(cells) + " |")
        if method != "base":
            points = []
            for epoch in sorted({rec["epoch"] for rec in mine}):
                at = [rec for rec in mine if rec["epoch"] == epoch]
                h = _cell([rec["train_entropy"] for rec in at if rec.get("train_entropy") is not None], False)
                nll = _cell([rec["train_nll"] for rec in at if rec.get("train_nll") is not None], False)
                points.append(f"{epoch}: {h} ({nll})")
            traj.append(f"| {method} | {cell.label} | " + ", ".join(points) + " |")
    return "\n".join(out + [""] + traj) + "\n"


def plot_study(results: list[dict[str, Any]], out_dir: Path, run_root: Path, sets: list[str]) -> list[Path]:
    """Entropy vs step (seed 0 of every method); accuracy per set and the probe's KL to base vs epoch (mean over
    seeds), as small PNGs."""
    plt = pyplot("the study's figures")
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(rec.get("cell_label") for rec in results):
        return plot_sweep(results, out_dir, run_root, sets, plt)
    paths = []
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for m in METHODS:
        run = run_root / f"{m}-s0"
        if rundir.metrics_file(run).exists():
            recs = [rec for rec in read_metrics(rundir.metrics_file(run)) if "event" not in rec]
            ax.plot(
                [rec["step"] for rec in recs],
                [rec["entropy"] for rec in recs],
                label=m,
                linewidth=1,
                color=f"C{list(METHODS).index(m)}",
            )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("entropy on trained tokens (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "study-entropy.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    scored = [s for s in sets if any("accuracy" in rec.get(s, {}) for rec in results)]  # not a set of base answers
    panels = [*scored, "kl"] if PROBE in sets else scored
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
    base = next((rec for rec in results if rec["method"] == "base"), None)

    def value(rec: dict[str, Any], panel: str) -> float:
        return rec[PROBE].get("kl_to_base", 0.0) if panel == "kl" else rec[panel]["accuracy"] * 100

    for ax, s in zip(axes[0], panels):
        for m in METHODS:
            rows = [rec for rec in results if rec["method"] == m]
            epochs = sorted({rec["epoch"] for rec in rows})
            if not epochs:
                continue
            ys = [statistics.mean(value(rec, s) for rec in rows if rec["epoch"] == e) for e in epochs]
            if base:
                epochs, ys = [0, *epochs], [value(base, s), *ys]
            ax.plot(epochs, ys, marker="o", markersize=3, label=m, color=f"C{list(METHODS).index(m)}")
        ax.set_title(f"{PROBE}: KL to base (nats/token)" if s == "kl" else f"{s} accuracy (%)", fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "study-accuracy.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def _steps(run_dir: Path) -> list[dict[str, Any]]:
    path = rundir.metrics_file(run_dir)
    return [rec for rec in read_metrics(path) if "event" not in rec] if path.exists() else []


def plot_sweep(results: list[dict[str, Any]], out_dir: Path, run_root: Path, sets: list[str], plt: Any) -> list[Path]:
    """A sweep's figures (lowest seed): entropy vs step, one panel per value of the keys every method shares (e.g. the
    lr); entropy vs training NLL (is entropy kept at a matched fit?); final in-domain accuracy vs probe KL to base."""
    seed = min(rec["seed"] for rec in results if rec["method"] != "base")
    runs = _runs(results)
    shared = lambda cell: Cell(tuple((k, v) for k, v in cell.values if not k.startswith("objective.")))  # noqa: E731
    own = lambda cell: Cell(tuple((k, v) for k, v in cell.values if k.startswith("objective.")))  # noqa: E731
    panels = list(dict.fromkeys(shared(c) for _, c in runs))
    styles = {c: s for c, s in zip(dict.fromkeys(own(c) for _, c in runs), ["-", "--", ":", "-."] * 4)}
    colour = {m: f"C{list(METHODS).index(m)}" for m in METHODS}
    paths = []
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False, sharey=True)
    fig2, ax2 = plt.subplots(figsize=(6, 4))
    for method, cell in runs:
        steps = _steps(run_root / cell.run_name(method, seed))
        if not steps:
            continue
        label = method + (f" {own(cell).label}" if own(cell).values else "")
        ax = axes[0][panels.index(shared(cell))]
        ax.plot(
            [r["step"] for r in steps],
            [r["entropy"] for r in steps],
            styles[own(cell)],
            color=colour[method],
            linewidth=1,
            label=label,
        )
        nll = [statistics.mean(r["nll"] for r in steps[max(0, i - 4) : i + 1]) for i in range(len(steps))]
        ent = [statistics.mean(r["entropy"] for r in steps[max(0, i - 4) : i + 1]) for i in range(len(steps))]
        ax2.plot(nll, ent, styles[own(cell)], color=colour[method], linewidth=1, label=f"{label} {shared(cell).label}")
    for ax, cell in zip(axes[0], panels):
        ax.set_title(cell.label or "all runs", fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("entropy on trained tokens (nats)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "study-entropy.png")
    fig.savefig(paths[-1], dpi=100)
    ax2.set_xscale("log")
    ax2.invert_xaxis()
    ax2.set_xlabel("training NLL of the targets (5-step mean; fitting goes right)")
    ax2.set_ylabel("entropy on trained tokens (nats)")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=6, ncol=2)
    fig2.tight_layout()
    paths.append(out_dir / "study-entropy-vs-nll.png")
    fig2.savefig(paths[-1], dpi=100)
    plt.close(fig)
    plt.close(fig2)
    return paths + [_plot_tradeoff(results, runs, out_dir, sets[0], colour, plt)]


def _plot_tradeoff(results: list, runs: list, out_dir: Path, first: str, colour: dict, plt: Any) -> Path:
    """Final in-domain accuracy against the probe's KL to the base, one point per (method, cell), seeds averaged."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, cell in [("base", Cell()), *runs]:
        mine = [r for r in results if r["method"] == method and r.get("cell_label", "") == cell.label]
        if not mine or PROBE not in mine[0]:
            continue
        last = [r for r in mine if r["epoch"] == max(x["epoch"] for x in mine)]
        x = statistics.mean(r[PROBE].get("kl_to_base", 0.0) for r in last)
        y = statistics.mean(r[first]["accuracy"] * 100 for r in last)
        ax.scatter([x], [y], color=colour.get(method, "black"), s=18)
        ax.annotate(f"{method} {cell.label}".strip(), (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel(f"{PROBE}: KL to base (nats/token; forgetting goes right)")
    ax.set_ylabel(f"{first} accuracy (%), final epoch")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / "study-tradeoff.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="a study folder (results.jsonl and/or units/*/results.jsonl)")
    ap.add_argument("--doc", type=Path, help="write the tables between the report markers of this markdown file")
    ap.add_argument("--figures", type=Path, help="write the PNG figures here")
    ap.add_argument("--collect", type=Path, help="first copy this study folder's records into FOLDER")
    ap.add_argument("--only-collect", action="store_true", help="with --collect: copy the records, no report")
    ap.add_argument("--name", default="", help="a second model's study: its own markers in --doc and figure names")
    args = ap.parse_args(argv)
    if args.collect:
        print(f"collected {len(collect(args.collect, args.folder))} record files into {args.folder}")
        if args.only_collect:
            return
    curves, md = generate(args.folder)
    if args.doc:
        atomic_write_text(args.doc, splice(args.doc.read_text(encoding="utf-8"), md, args.name))
        print(f"tables: {args.doc}")
    else:
        print(md)
    if args.figures and curves:
        for p in plot_report(curves, args.figures, args.name):
            print(f"figure: {p}")


if __name__ == "__main__":
    main()
