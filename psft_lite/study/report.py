"""The forgetting benchmark's report (docs/study.md): per-epoch tables, trade-off curves and verdicts with bootstrap
confidence intervals, generated from a study folder's records alone, so every figure can be regenerated and checked.

Each evaluated checkpoint of a (method, seed) run is a point: in-domain accuracy (learning), retention KL to the base
(forgetting), OOD accuracy. A method's curve runs from the base model (epoch 0) through its epochs. Methods are
compared at matched in-domain accuracy (how much did each forget to get there?) and at matched forgetting (how much
did each learn by then?), reading each curve where it first crosses the level (linear between epochs), so no epoch is
chosen per method. Confidence intervals resample problems (the same problems for every method: paired) and seeds.

    python -m psft_lite.study.report STUDY_FOLDER [--also LABEL=FOLDER] --doc docs/study.md --figures docs/study
    python -m psft_lite.study.report docs/study/benchmark-gemma3 --name gemma3-270m --doc docs/study.md   # a 2nd model
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from psft_lite.core.files import atomic_write_text
from psft_lite.study.plot import pyplot

B = 2000  # bootstrap replicates
LEVEL = 0.95  # confidence level of every interval
BEGIN, END = "<!-- benchmark-report:begin -->", "<!-- benchmark-report:end -->"


def markers(name: str = "") -> tuple[str, str]:
    """The markers a study's generated block sits between in docs/study.md; `name` tells a second model's study apart
    (`<!-- benchmark-report gemma3-270m:begin -->`)."""
    if not name:
        return BEGIN, END
    return f"<!-- benchmark-report {name}:begin -->", f"<!-- benchmark-report {name}:end -->"


#: the measures of one checkpoint: key → (set, what, label in tables)
MEASURES = {
    "acc": ("in_domain", "correct", "in-domain acc %"),
    "format": ("in_domain", "format_used", "format used %"),
    "answer": ("in_domain", "answer_right", "right in any format %"),
    "ood": ("ood", "correct", "OOD acc %"),
    "kept": ("retention", "correct", "retention kept %"),
    "kl": ("retention", "kl_rows", "retention KL"),
}


def read_records(folder: Path) -> list[dict[str, Any]]:
    """The latest record per (method, cell, seed, epoch) of `folder`/results.jsonl (or .jsonl.gz)."""
    path = folder / "results.jsonl"
    if not path.exists():
        path = folder / "results.jsonl.gz"
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return list({(r["method"], r.get("cell_label", ""), r["seed"], r["epoch"]): r for r in recs}.values())


def label_of(rec: dict[str, Any], prefix: str | None = None) -> str:
    """`psft-base`, `psft-base clip_high=1` or, for a study folder given a name, that name."""
    if rec["method"] == "base":
        return "base"
    return prefix or (rec["method"] + (f" {rec['cell_label']}" if rec.get("cell_label") else ""))


# ---------------------------------------------------------------------------------------------------------------------
# Bootstrap


@dataclass
class Curve:
    """One method's points: per measure, an array [seeds, epochs+1, problems] (epoch 0 = the base model) — a 0/1
    outcome, or for the KL (sum, tokens) per prompt as [..., 2]."""

    label: str
    seeds: list[int]
    epochs: list[int]
    #: [seeds, epochs+1]: which (seed, epoch) was evaluated. A seed trained for fewer epochs (or still running) counts
    #: at the epochs it has; its missing points are NaN in `data` and every statistic is taken over the seeds present.
    present: np.ndarray
    data: dict[str, np.ndarray] = field(default_factory=dict)
    train_entropy: np.ndarray | None = None  # [seeds, epochs]

    def seeds_at(self, j: int) -> np.ndarray:
        """Indices (into `seeds`) of the seeds evaluated at point j (0 = the base: every seed)."""
        return np.flatnonzero(self.present[:, j])


def _bits(s: str) -> np.ndarray:
    return np.frombuffer(s.encode(), dtype=np.uint8) - ord("0")


def _values(rec: dict[str, Any], key: str) -> np.ndarray | None:
    name, what, _ = MEASURES[key]
    entry = rec.get(name, {})
    if what not in entry:
        return None
    return np.asarray(entry[what], dtype=float) if what == "kl_rows" else _bits(entry[what]).astype(float)


def build_curves(labelled: list[tuple[str, dict[str, Any]]]) -> tuple[list[Curve], dict[str, Any]]:
    """Curves of every label from (label, record) pairs; every curve starts at the base record."""
    base = next(r for lab, r in labelled if lab == "base")
    by_label: dict[str, dict[tuple[int, int], dict[str, Any]]] = {}
    for lab, r in labelled:
        if lab != "base":
            by_label.setdefault(lab, {})[(r["seed"], r["epoch"])] = r
    curves = []
    for lab, recs in by_label.items():
        seeds = sorted({s for s, _ in recs})
        epochs = sorted({e for _, e in recs})
        present = np.array([[True] + [(s, e) in recs for e in epochs] for s in seeds])
        curve = Curve(lab, seeds, epochs, present)
        for key in MEASURES:
            b = _values(base, key)
            if b is None:
                continue
            missing = np.full_like(b, np.nan)
            rows = [[b] + [_values(recs[(s, e)], key) if (s, e) in recs else missing for e in epochs] for s in seeds]
            curve.data[key] = np.stack([np.stack(r) for r in rows])
        curve.train_entropy = np.array(
            [[recs.get((s, e), {}).get("train_entropy") or np.nan for e in epochs] for s in seeds], dtype=float
        )
        curves.append(curve)
    return curves, base


class Resampler:
    """Shared bootstrap draws: per set size, problem indices [B, n]; per seed count, seed indices [B, S]. Every curve
    uses the same draws, so differences between methods are paired over problems (and seeds, by seed number)."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.problems: dict[int, np.ndarray] = {}
        self.seeds: dict[int, np.ndarray] = {}
        self.done: dict[tuple[int, str], np.ndarray] = {}  # (curve, measure) → its replicates: drawn once, read often

    def problem_idx(self, n: int) -> np.ndarray:
        if n not in self.problems:
            self.problems[n] = self.rng.integers(0, n, size=(B, n))
        return self.problems[n]

    def seed_idx(self, s: int) -> np.ndarray:
        if s not in self.seeds:
            self.seeds[s] = self.rng.integers(0, s, size=(B, s))
        return self.seeds[s]


def point(curve: Curve, key: str) -> np.ndarray:
    """The measure at each epoch, mean over seeds: [epochs+1] (a percentage, or the KL in nats per token)."""
    x = curve.data[key]
    if key == "kl":
        return np.nanmean(x[..., 0].sum(-1) / np.maximum(x[..., 1].sum(-1), 1), axis=0)
    return 100 * np.nanmean(x.mean(-1), axis=0)


def replicates(curve: Curve, key: str, rs: Resampler) -> np.ndarray:
    """The measure at each epoch in every bootstrap replicate: [B, epochs+1] (computed once per curve and measure;
    every table and figure reads the same draws)."""
    if (id(curve), key) not in rs.done:
        rs.done[(id(curve), key)] = _replicates(curve, key, rs)
    return rs.done[(id(curve), key)]


def _replicates(curve: Curve, key: str, rs: Resampler) -> np.ndarray:
    x = curve.data[key]
    idx = rs.problem_idx(x.shape[2])
    if key == "kl":
        sums = x[..., 0][:, :, idx].sum(-1)  # [S, E, B]
        counts = np.maximum(x[..., 1][:, :, idx].sum(-1), 1)
        per_seed = sums / counts
    else:
        per_seed = 100 * x[:, :, idx].mean(-1)  # [S, E, B]
    per_seed = per_seed.transpose(2, 0, 1)  # [B, S, E]
    out = np.empty(per_seed.shape[::2])  # each point resamples among its own seeds (the shared draws for that count)
    for j in range(per_seed.shape[2]):
        own = per_seed[:, curve.seeds_at(j), j]
        out[:, j] = np.take_along_axis(own, rs.seed_idx(own.shape[1]), axis=1).mean(1)
    return out


def crossing(ys: np.ndarray, xs: np.ndarray, level: float) -> float:
    """x where the curve (xs, ys), in epoch order, first reaches y ≥ level (linear between points); nan if never."""
    for i in range(len(ys)):
        if ys[i] >= level:
            if i == 0 or ys[i] == ys[i - 1]:
                return float(xs[i])
            t = (level - ys[i - 1]) / (ys[i] - ys[i - 1])
            return float(xs[i - 1] + t * (xs[i] - xs[i - 1]))
    return math.nan


def at_level(curve: Curve, rs: Resampler, by: str, level: float, read: str) -> np.ndarray:
    """Per replicate, `read` where the curve first reaches `level` of `by` (e.g. the KL at 60 % in-domain)."""
    yb, xb = replicates(curve, by, rs), replicates(curve, read, rs)
    return np.array([crossing(yb[b], xb[b], level) for b in range(B)])


def ci(values: np.ndarray) -> tuple[float, float]:
    v = values[~np.isnan(values)]
    if not len(v):
        return (math.nan, math.nan)
    lo, hi = np.quantile(v, [(1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------------------------------------
# Tables


def _fmt(x: float, key: str) -> str:
    return "—" if math.isnan(x) else (f"{x:.3f}" if key == "kl" else f"{x:.1f}")


def _with_ci(mean: float, reps: np.ndarray, key: str) -> str:
    lo, hi = ci(reps)
    return f"{_fmt(mean, key)} [{_fmt(lo, key)}, {_fmt(hi, key)}]"


def epoch_table(curves: list[Curve], rs: Resampler) -> str:
    keys = [k for k in MEASURES if all(k in c.data for c in curves)]
    head = "| method | seeds | epoch | " + " | ".join(MEASURES[k][2] for k in keys) + " | train entropy |"
    lines = [head, "|---|---|---|" + "---|" * (len(keys) + 1)]
    base = curves[0]
    lines.append("| base | — | 0 | " + " | ".join(_fmt(point(base, k)[0], k) for k in keys) + " | — |")
    for c in curves:
        reps = {k: replicates(c, k, rs) for k in keys}
        for j, e in enumerate(c.epochs, start=1):
            cells = [_with_ci(point(c, k)[j], reps[k][:, j], k) for k in keys]
            hs = c.train_entropy[:, j - 1] if c.train_entropy is not None else np.array([])
            h = float(np.mean(hs[~np.isnan(hs)])) if (~np.isnan(hs)).any() else math.nan
            n_seeds = len(c.seeds_at(j))
            lines.append(f"| {c.label} | {n_seeds} | {e} | " + " | ".join(cells) + f" | {_fmt(h, 'kl')} |")
    return "\n".join(lines)


def levels(curves: list[Curve], key: str, step: float) -> list[float]:
    """Round levels of `key` that every learning curve reaches on its mean: up to the lowest of their peaks."""
    peaks = [point(c, key)[1:].max() for c in curves]
    top = min(p for p in peaks if p > step) if any(p > step for p in peaks) else 0.0
    n = int(top // step)
    picks = sorted({max(1, round(n * f)) for f in (1 / 3, 2 / 3, 1.0)}) if n else []
    return [k * step for k in picks]


def matched_table(curves: list[Curve], rs: Resampler, by: str, read: str, lv: list[float], ref: str) -> str:
    """`read` where each curve first reaches each level of `by`, with CIs, and the paired difference to `ref`."""
    name_by, name_read = MEASURES[by][2], MEASURES[read][2]
    head = f"| {name_by} reached | method | {name_read} there | difference to {ref} | reached in % of replicates |"
    lines = [head, "|---|---|---|---|---|"]
    refc = next((c for c in curves if c.label == ref), None)
    for level in lv:
        ref_vals = at_level(refc, rs, by, level, read) if refc else None
        for c in curves:
            vals = at_level(c, rs, by, level, read)
            mean_curve = crossing(point(c, by), point(c, read), level)
            diff = "—"
            if ref_vals is not None and c.label != ref:
                d = vals - ref_vals
                lo, hi = ci(d)
                if not math.isnan(lo):
                    diff = f"{_fmt(float(np.nanmean(d)), read)} [{_fmt(lo, read)}, {_fmt(hi, read)}]"
                    diff += " *" if lo > 0 or hi < 0 else ""
            lo, hi = ci(vals)
            cell = (
                f"{_fmt(mean_curve, read)} [{_fmt(lo, read)}, {_fmt(hi, read)}]"
                if not math.isnan(mean_curve)
                else "not reached"
            )
            reached = 100 * float(np.mean(~np.isnan(vals)))
            lines.append(f"| {_fmt(level, by)} | {c.label} | {cell} | {diff} | {reached:.0f} |")
    return "\n".join(lines)


def report_markdown(curves: list[Curve], base: dict[str, Any], rs: Resampler, ref: str = "sft") -> str:
    seeds = sorted({s for c in curves for s in c.seeds})
    n = {k: curves[0].data[k].shape[2] for k in MEASURES if k in curves[0].data}
    parts = [
        f"Generated by `make study-report` from the committed records; {B} bootstrap replicates over problems and "
        f"seeds (paired across methods), {LEVEL:.0%} intervals in brackets. Seeds present: {seeds}. Problems: "
        f"in-domain {n.get('acc', 0)}, OOD {n.get('ood', 0)}, retention {n.get('kl', 0)} prompts (KL) of which "
        f"{n.get('kept', 0)} checkable answers the base got right (kept).",
        "",
        "#### Every evaluated checkpoint",
        "",
        epoch_table(curves, rs),
    ]
    acc_levels = levels(curves, "acc", 5.0)
    kl_levels = levels(curves, "kl", 0.01)
    if acc_levels:
        parts += [
            "",
            "#### At matched in-domain accuracy: how much was forgotten (retention KL; lower is better)",
            "",
            matched_table(curves, rs, "acc", "kl", acc_levels, ref),
            "",
            matched_table(curves, rs, "acc", "ood", acc_levels, ref),
        ]
    if kl_levels:
        parts += [
            "",
            "#### At matched forgetting (retention KL): how much was learned (higher is better)",
            "",
            matched_table(curves, rs, "kl", "acc", kl_levels, ref),
            "",
            matched_table(curves, rs, "kl", "answer", kl_levels, ref),
        ]
    parts += ["", "`*`: the interval of the difference excludes 0."]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# Figures


def plot_report(curves: list[Curve], rs: Resampler, out_dir: Path, name: str = "") -> list[Path]:
    """benchmark-tradeoff.png (in-domain and OOD accuracy against retention KL, every epoch a point, 95 % intervals
    both ways) and benchmark-epochs.png (format used, right in any format, retention kept, per epoch); a named study
    writes benchmark-NAME-tradeoff.png and benchmark-NAME-epochs.png."""
    plt = pyplot("the benchmark report's figures")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"benchmark-{name}" if name else "benchmark"
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for i, c in enumerate(curves):
        x, xr = point(c, "kl"), replicates(c, "kl", rs)
        for ax, key in zip(axes, ("acc", "ood")):
            y, yr = point(c, key), replicates(c, key, rs)
            xerr = np.abs(np.array([ci(xr[:, j]) for j in range(len(x))]).T - x)
            yerr = np.abs(np.array([ci(yr[:, j]) for j in range(len(y))]).T - y)
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, marker="o", ms=3, lw=1.2, capsize=2, color=f"C{i}", label=c.label)
    for ax, key in zip(axes, ("acc", "ood")):
        ax.set_xlabel("retention KL to base (nats/token; forgetting grows right)")
        ax.set_ylabel(MEASURES[key][2].replace(" %", " (%)"))
        ax.grid(alpha=0.3)
    axes[0].set_title("learning vs forgetting (each point an epoch; base at 0)", fontsize=10)
    axes[1].set_title("out-of-domain vs forgetting", fontsize=10)
    axes[0].legend(fontsize=8, loc="best")
    fig.tight_layout()
    paths.append(out_dir / f"{stem}-tradeoff.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    keys = [k for k in ("format", "answer", "kept") if all(k in c.data for c in curves)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for i, c in enumerate(curves):
        xs = [0, *c.epochs]
        for ax, key in zip(axes[0], keys):
            y, yr = point(c, key), replicates(c, key, rs)
            err = np.abs(np.array([ci(yr[:, j]) for j in range(len(y))]).T - y)
            ax.errorbar(xs, y, yerr=err, marker="o", ms=3, lw=1.2, capsize=2, color=f"C{i}", label=c.label)
    for ax, key in zip(axes[0], keys):
        ax.set_title(MEASURES[key][2].replace(" %", " (%)"), fontsize=10)
        ax.set_xlabel("epoch (0 = base)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="best")
    fig.tight_layout()
    paths.append(out_dir / f"{stem}-epochs.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# Entry point


def generate(folder: Path, also: dict[str, Path] | None = None, ref: str = "sft") -> tuple[list[Curve], str]:
    """(curves, markdown) of a study folder and any extra folders given a label (e.g. hint+idft=FOLDER)."""
    labelled = [(label_of(r), r) for r in read_records(folder)]
    for name, extra in (also or {}).items():
        labelled += [(name, r) for r in read_records(extra) if r["method"] != "base"]
    curves, base = build_curves(labelled)
    order = {lab: i for i, (lab, _) in enumerate(labelled)}
    curves.sort(key=lambda c: (c.label != ref, order[c.label]))
    return curves, report_markdown(curves, base, Resampler(), ref)


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


def splice(doc: str, block: str, name: str = "") -> str:
    """`doc` with the text between the (named) report markers replaced by `block`."""
    begin, end = markers(name)
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(doc):
        raise ValueError(f"no {begin} … {end} markers to write the report between")
    return pattern.sub(lambda _: f"{begin}\n{block}{end}", doc)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="a study folder (results.jsonl)")
    ap.add_argument("--also", action="append", default=[], help="LABEL=FOLDER: another study's runs under one label")
    ap.add_argument("--doc", type=Path, help="write the tables between the report markers of this markdown file")
    ap.add_argument("--figures", type=Path, help="write the PNG figures here")
    ap.add_argument("--collect", type=Path, help="first copy this study folder's records into FOLDER")
    ap.add_argument("--name", default="", help="a second model's study: its own markers in --doc and figure names")
    ap.add_argument("--only-collect", action="store_true", help="with --collect: copy the records, no report")
    args = ap.parse_args(argv)
    if args.collect:
        print(f"collected {len(collect(args.collect, args.folder))} record files into {args.folder}")
        if args.only_collect:
            return
    also = dict(a.split("=", 1) for a in args.also)
    curves, md = generate(args.folder, {k: Path(v) for k, v in also.items()})
    if args.doc:
        atomic_write_text(args.doc, splice(args.doc.read_text(encoding="utf-8"), md, args.name))
        print(f"tables: {args.doc}")
    else:
        print(md)
    if args.figures:
        for p in plot_report(curves, Resampler(), args.figures, args.name):
            print(f"figure: {p}")


if __name__ == "__main__":
    main()
