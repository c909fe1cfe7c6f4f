"""The forgetting benchmark's records read as curves, and the estimates read off them.

A (method, seed) run is evaluated at measured steps (25, 50 and each epoch end); every point carries, per item, what
was learned (in-domain accuracy in the taught format; the transfer set) and what the model can still do (the
general-ability suite, compared item by item with the base model's answers).

Statistics, honest for 2–5 seeds (psft_lite.core.stats):
- within a seed, the standard error of a mean over items (analytic, the limit of a bootstrap over items; for a change
  against the base or a difference between methods, of the per-item paired differences);
- across seeds, a t-interval on the seed means (df = seeds − 1), never narrower than the within-seed error allows;
- point estimates are the mean of the seeds' observed values, never a mean of replicates;
- matched comparisons interpolate each seed's curve between its two measured checkpoints that bracket the level
  (the base counts as the checkpoint at step 0; the bracket used is shown), and say how many seeds reach it.
"""

from __future__ import annotations

import functools
import gzip
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from psft_lite.core.stats import seed_interval
from psft_lite.study.methods import Cell

#: one checkpoint's measures: key → (set in the record, 0/1 string in it, label in tables)
MEASURES = {
    "acc": ("in_domain", "correct", "in-domain %"),
    "format": ("in_domain", "format_used", "format used %"),
    "transfer": ("transfer", "correct", "transfer %"),
    "general": ("general", "right", "general ability %"),
    "leak": ("general", "leak", "taught format in general replies %"),
}


# ---------------------------------------------------------------------------------------------------------------------
# Records


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_records(folder: Path) -> list[dict[str, Any]]:
    """Every record of a study folder — its own results.jsonl and each committed unit's (units/*/results.jsonl) —
    the latest per (method, cell, seed, step)."""
    paths = [p for p in [folder / "results.jsonl", folder / "results.jsonl.gz"] if p.exists()]
    paths += sorted(folder.glob("units/*/results.jsonl"))
    return latest_results([with_leak(r, p.parent / "evals") for p in paths for r in read_jsonl(p)])


def with_leak(rec: dict[str, Any], evals: Path) -> dict[str, Any]:
    """The record with `general.leak`: per generated reply of the suite, 1 when it writes a taught format (the
    opening of the in-domain set's `format`, e.g. `[[answer: `) — counted from the committed replies
    (evals/<run>-step<N>.jsonl.gz), so the behaviour the suite's verifiers cannot see is in every record. Unchanged
    when the run taught no format or its replies are not committed."""
    from psft_lite.inference.evaluate import format_opening
    from psft_lite.inference.retention import leaked

    run = (
        "base"
        if rec["method"] == "base"
        else Cell(tuple(rec.get("cell", {}).items())).run_name(rec["method"], rec["seed"])
    )
    path = evals / f"{run}-step{rec['step']}.jsonl.gz"
    if "general" not in rec or "leak" in rec["general"] or not path.exists():
        return rec
    details = {d["set"]: d["rows"] for d in read_jsonl(path)}
    openings = {format_opening(_source_row(r["where"]).get("format")).strip() for r in details.get("in_domain", [])}
    openings.discard("")
    if not openings or "general" not in details:
        return rec
    checked = _checked_ids()
    bits = "".join(
        "1" if leaked(r["answer"], tuple(openings)) else "0" for r in details["general"] if r["id"] in checked
    )
    if not bits:  # a suite of multiple-choice kinds only (eval.retention_kinds) writes no replies
        return rec
    return {**rec, "general": {**rec["general"], "leak": bits}}


_ROWS: dict[str, list[str]] = {}


def _source_row(where: str) -> dict[str, Any]:
    """The data row a detail came from (`data/arith/format_test.jsonl:12`, relative to the repository)."""
    file, _, line = where.rpartition(":")
    if file not in _ROWS:
        _ROWS[file] = Path(file).read_text(encoding="utf-8").splitlines() if Path(file).is_file() else []
    lines = _ROWS[file]
    if not (line.isdigit() and 0 < int(line) <= len(lines)):
        return {}
    row = json.loads(lines[int(line) - 1])
    return row if isinstance(row, dict) else {}


@functools.cache
def _checked_ids() -> frozenset[str]:
    from psft_lite.inference.retention import load_suite

    return frozenset(it.id for it in load_suite() if it.score == "check")


def label_of(rec: dict[str, Any]) -> str:
    """`sft`, `psft-snapshot refresh_every=64`, or `base`."""
    if rec["method"] == "base":
        return "base"
    return rec["method"] + (f" {rec['cell_label']}" if rec.get("cell_label") else "")


def bits_of(rec: dict[str, Any], key: str) -> np.ndarray | None:
    name, what, _ = MEASURES[key]
    s = rec.get(name, {}).get(what)
    return None if s is None else (np.frombuffer(s.encode(), dtype=np.uint8) - ord("0")).astype(float)


# ---------------------------------------------------------------------------------------------------------------------
# Curves and their statistics


@dataclass
class Curve:
    """One method's measured points: the base (step 0) and each evaluated step, per seed. `bits[key]` is
    [seeds, points, items] (NaN where a seed was not evaluated), `kl` [seeds, points, prompts, 2] (sum, tokens)."""

    label: str
    seeds: list[int]
    steps: list[int]  # 0 first: the base
    epochs: list[float]
    bits: dict[str, np.ndarray] = field(default_factory=dict)
    kl: np.ndarray | None = None
    train: dict[str, np.ndarray] = field(default_factory=dict)  # train_entropy, clip_frac: [seeds, points]

    def present(self, j: int) -> np.ndarray:
        """Indices of the seeds evaluated at point j."""
        key = next(iter(self.bits))
        return np.flatnonzero(~np.isnan(self.bits[key][:, j, 0]))


@dataclass
class Estimate:
    """A mean over seeds with its interval, and how many seeds it rests on."""

    mean: float
    low: float
    high: float
    seeds: int

    def fmt(self, digits: int = 1, signed: bool = False) -> str:
        if math.isnan(self.mean):
            return "—"
        f = f"{{:{'+' if signed else ''}.{digits}f}}"
        return f"{f.format(self.mean)} [{f.format(self.low)}, {f.format(self.high)}]"

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def build_curves(records: list[dict[str, Any]]) -> tuple[list[Curve], dict[str, Any]]:
    """A curve per label, every one starting at the base record."""
    base = next(r for r in records if r["method"] == "base")
    by_label: dict[str, dict[tuple[int, int], dict[str, Any]]] = {}
    for r in records:
        if r["method"] != "base":
            by_label.setdefault(label_of(r), {})[(r["seed"], r["step"])] = r
    curves = []
    for label, recs in by_label.items():
        seeds = sorted({s for s, _ in recs})
        steps = [0, *sorted({st for _, st in recs})]
        epochs = [0.0] + [next(float(r["epoch"]) for (_, st), r in recs.items() if st == step) for step in steps[1:]]
        curve = Curve(label, seeds, steps, epochs)
        for key in MEASURES:
            b = bits_of(base, key)
            if b is None:
                continue
            arr = np.full((len(seeds), len(steps), len(b)), np.nan)
            arr[:, 0] = b
            for (s, st), r in recs.items():
                v = bits_of(r, key)
                if v is not None:
                    arr[seeds.index(s), steps.index(st)] = v
            curve.bits[key] = arr
        kl_base = base.get("retention", {}).get("kl_rows")
        if kl_base is not None:
            kl = np.full((len(seeds), len(steps), len(kl_base), 2), np.nan)
            kl[:, 0] = np.asarray(kl_base, dtype=float)
            for (s, st), r in recs.items():
                rows = r.get("retention", {}).get("kl_rows")
                if rows is not None:
                    kl[seeds.index(s), steps.index(st)] = np.asarray(rows, dtype=float)
            curve.kl = kl
        for name in ("train_entropy", "clip_frac"):
            arr = np.full((len(seeds), len(steps)), np.nan)
            for (s, st), r in recs.items():
                if r.get(name) is not None:
                    arr[seeds.index(s), steps.index(st)] = r[name]
            curve.train[name] = arr
        curves.append(curve)
    return curves, base


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    """Mean (in points) of a 0/1 (or −1/0/1) vector and its standard error."""
    return 100 * float(x.mean()), 100 * float(x.std() / math.sqrt(len(x)))


def _combine(values: list[tuple[float, float]]) -> Estimate:
    if not values:
        return Estimate(math.nan, math.nan, math.nan, 0)
    mean, lo, hi = seed_interval([v for v, _ in values], [se for _, se in values])
    return Estimate(mean, lo, hi, len(values))


def level(c: Curve, key: str, j: int) -> Estimate:
    """The measure at point j (a share, in %), across the seeds evaluated there; its interval kept within 0–100 % (a
    t-interval over two or three seeds can reach past the range, and the share cannot)."""
    e = _combine([_mean_se(c.bits[key][s, j]) for s in c.present(j)])
    return Estimate(e.mean, max(e.low, 0.0), min(e.high, 100.0), e.seeds) if e.seeds else e


def change(c: Curve, key: str, j: int) -> Estimate:
    """The change at point j against the base, paired by item within each seed (points)."""
    return _combine([_mean_se(c.bits[key][s, j] - c.bits[key][s, 0]) for s in c.present(j)])


def seed_differences(c: Curve, ref: Curve, key: str, j: int, k: int) -> dict[int, tuple[float, float]]:
    """Per seed evaluated in both, (mean, standard error) in points of c at point j − ref at its point k, paired by
    seed (same data order and initialisation) and by item."""
    out = {}
    for s in c.seeds:
        if s not in ref.seeds:
            continue
        a, b = c.bits[key][c.seeds.index(s), j], ref.bits[key][ref.seeds.index(s), k]
        if not np.isnan(a[0]) and not np.isnan(b[0]):
            out[s] = _mean_se(a - b)
    return out


def difference(c: Curve, ref: Curve, key: str, j: int, k: int | None = None) -> Estimate:
    """c at point j − ref at its point k (by default the same step), across the paired seeds (`seed_differences`)."""
    if k is None:
        if c.steps[j] not in ref.steps:
            return _combine([])
        k = ref.steps.index(c.steps[j])
    return _combine(list(seed_differences(c, ref, key, j, k).values()))


def kl_at(c: Curve, j: int) -> Estimate:
    """KL(base ‖ model) per token on the base's answers at point j (secondary); the within-seed error by the delta
    method over prompts."""
    if c.kl is None:
        return _combine([])
    vals = []
    for s in c.present(j):
        sums, n = c.kl[s, j, :, 0], c.kl[s, j, :, 1]
        r = sums.sum() / n.sum()
        resid = (sums - r * n) / n.mean()
        vals.append((float(r), float(resid.std() / math.sqrt(len(n)))))
    mean, lo, hi = seed_interval([v for v, _ in vals], [se for _, se in vals])
    return Estimate(mean, max(lo, 0.0), hi, len(vals))  # a KL is never negative


@dataclass
class Matched:
    """A curve read where it reaches a level of `by`: the value of `read` there (interpolated within each seed
    between the two measured points that bracket the level), the seeds that reach it, and the brackets used."""

    estimate: Estimate
    reached: int
    of: int
    brackets: set[tuple[int, int]]


def at_level(c: Curve, by: str, lvl: float, read: str, ref: Curve | None = None) -> Matched:
    """`read` (a change against the base in points, or with `ref` the difference to ref at ref's own crossing)
    where each seed's `by` curve first reaches `lvl` %."""
    vals, brackets = [], set()
    for si, seed in enumerate(c.seeds):
        got = _crossing(c, si, by, lvl, read)
        if got is None:
            continue
        value, se, bracket = got
        if ref is not None:
            if seed not in ref.seeds:
                continue
            other = _crossing(ref, ref.seeds.index(seed), by, lvl, read)
            if other is None:
                continue
            value, se = value - other[0], math.hypot(se, other[1])
        vals.append((value, se))
        brackets.add(bracket)
    return Matched(_combine(vals), len(vals), len(c.seeds), brackets)


def _crossing(c: Curve, si: int, by: str, lvl: float, read: str) -> tuple[float, float, tuple[int, int]] | None:
    ys = [100 * np.nanmean(c.bits[by][si, j]) for j in range(len(c.steps))]
    for j in range(1, len(ys)):
        if math.isnan(ys[j]) or math.isnan(ys[j - 1]):
            continue
        if ys[j - 1] < lvl <= ys[j]:
            t = (lvl - ys[j - 1]) / (ys[j] - ys[j - 1])
            a = _mean_se(c.bits[read][si, j - 1] - c.bits[read][si, 0])
            b = _mean_se(c.bits[read][si, j] - c.bits[read][si, 0])
            return (1 - t) * a[0] + t * b[0], (1 - t) * a[1] + t * b[1], (c.steps[j - 1], c.steps[j])
    return None


def levels(curves: list[Curve], key: str = "acc", step: float = 10.0) -> list[float]:
    """Round levels of `key` that every learning curve's seed mean reaches: multiples of `step` up to the lowest peak
    (curves that learn nothing — a peak under `step` — are left out, and show as 'not reached')."""
    peaks = [max(100 * np.nanmean(c.bits[key][:, j]) for j in range(1, len(c.steps))) for c in curves]
    learning = [p for p in peaks if p >= step]
    top = min(learning) if learning else 0.0
    return [k * step for k in range(1, int(top // step) + 1)]


def latest_results(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (method, cell, seed, epoch), the last written (processes side by side may repeat one)."""
    return list({(rec["method"], rec.get("cell_label", ""), rec["seed"], rec["step"]): rec for rec in results}.values())
