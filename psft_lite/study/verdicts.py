"""The rule that sets psft-lite's default objective from the forgetting benchmark, written down before the benchmark's
seeds 1 and 2 ran (docs/study.md, "How the default is chosen") and applied to the committed records by
`make study-report`, so the default follows from the records and not from a reading chosen after them.

Every method is compared with sft on each model, paired by seed and by item:
- **learns**: its in-domain accuracy at the end of its budget minus sft's. A method whose interval lies below 0 has
  not learned what sft learned, and cannot be the default however little it forgets.
- **primary, what the model can still do**: its general-ability change minus sft's, at the highest in-domain level
  (a multiple of 10 %) that every paired seed of both reaches, each read between its measured checkpoints. One level,
  fixed by the rule, so no level is picked for a method. Better or worse when the interval excludes 0.
- **secondary, behaviour the suite's accuracy cannot see**: at the same level, the taught format in general replies
  (lower is better) and transfer. Better when better on one and worse on neither.
KL to the base decides nothing: sft_kl's penalty minimises it.

The default, among the methods that learn on every model they ran on and are worse on none (primary or secondary):
1. the ones better than sft on the primary on some model; the largest mean primary point wins;
2. else the ones better on the secondary on some model, the same way;
3. else no method is shown better than sft on what the model can still do. The current default stays if it is
   among them (it is not worse anywhere and costs about what sft costs once its reference is cached); else sft.
Any row on fewer than 3 seeds makes the outcome provisional: it is shown, and it decides nothing.

    python -m psft_lite.study.verdicts docs/study/forgetting docs/study/forgetting-gemma3 --doc docs/study.md
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from psft_lite.core.files import atomic_write_text
from psft_lite.study.blocks import splice
from psft_lite.study.curves import Curve, Estimate, at_level, build_curves, difference, read_records

REF = "sft"
CURRENT_DEFAULT = "sft_kl"
VERDICT_SEEDS = 3  # fewer: the row is provisional
BLOCK = "default"  # docs/study.md's generated block for the outcome


@dataclass
class Row:
    """One method against sft on one model."""

    label: str
    seeds: int
    learned: Estimate  # in-domain accuracy at the end of the budget, minus sft's (points)
    level: float | None  # the matched in-domain level the comparisons are read at
    general: Estimate  # primary: general-ability change minus sft's there (points; higher is better)
    leak: Estimate  # the taught format in general replies, minus sft's (points; lower is better)
    transfer: Estimate  # transfer change minus sft's (points; higher is better)

    @property
    def learns(self) -> bool:
        return not math.isnan(self.learned.mean) and not self.learned.high < 0

    @property
    def primary(self) -> str:
        return sign(self.general)

    @property
    def secondary(self) -> str:
        said = {sign(self.leak, lower_is_better=True), sign(self.transfer)}
        if said == {"not measured"}:
            return "not measured"
        if "better" in said and "worse" in said:
            return "mixed"
        return next((w for w in ("worse", "better") if w in said), "no difference shown")

    @property
    def provisional(self) -> bool:
        return self.seeds < VERDICT_SEEDS

    @property
    def eligible(self) -> bool:
        """Learns the task and is worse on nothing the rule reads."""
        return self.learns and self.primary != "worse" and self.secondary not in ("worse", "mixed")


def sign(e: Estimate, lower_is_better: bool = False) -> str:
    if math.isnan(e.mean):
        return "not measured"
    if not e.excludes_zero:
        return "no difference shown"
    return "better" if (e.low > 0) != lower_is_better else "worse"


def _none() -> Estimate:
    return Estimate(math.nan, math.nan, math.nan, 0)


def matched_level(c: Curve, ref: Curve, by: str = "acc", step: float = 10.0) -> float | None:
    """The highest multiple of `step` % of `by` that every seed c shares with ref reaches, in both curves."""
    common = [s for s in c.seeds if s in ref.seeds]
    if not common:
        return None
    for k in range(int(100 // step), 0, -1):
        if at_level(c, by, k * step, "general", ref).reached == len(common):
            return k * step
    return None


def rows(curves: list[Curve], ref: str = REF) -> list[Row]:
    """Every method's row against `ref` (none when `ref` has no curve)."""
    base = next((c for c in curves if c.label == ref), None)
    if base is None:
        return []
    out = []
    for c in curves:
        if c is base:
            continue
        lvl = matched_level(c, base)
        read = {
            key: at_level(c, "acc", lvl, key, base).estimate if lvl is not None and key in c.bits else _none()
            for key in ("general", "leak", "transfer")
        }
        learned = difference(c, base, "acc", len(c.steps) - 1, len(base.steps) - 1)
        seeds = len([s for s in c.seeds if s in base.seeds])
        out.append(Row(c.label, seeds, learned, lvl, read["general"], read["leak"], read["transfer"]))
    return out


def table(rs: list[Row], ref: str = REF) -> str:
    lines = [
        f"| method | seeds paired with {ref} | in-domain at the end, minus {ref} | learns | compared at in-domain % | "
        f"general ability, minus {ref} (primary) | taught format in general replies, minus {ref} | transfer, minus "
        f"{ref} | primary | secondary |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rs:
        lines.append(
            f"| {r.label} | {r.seeds} | {r.learned.fmt(signed=True)} | {'yes' if r.learns else 'no'} | "
            f"{'—' if r.level is None else f'{r.level:.0f}'} | {r.general.fmt(signed=True)} | "
            f"{r.leak.fmt(signed=True)} | {r.transfer.fmt(signed=True)} | {r.primary} | {r.secondary} |"
        )
    return "\n".join(lines)


@dataclass
class Decision:
    choice: str
    reason: str
    provisional: bool


def decide(models: dict[str, list[Row]], current: str = CURRENT_DEFAULT, ref: str = REF) -> Decision:
    """The rule (module docstring) over each model's rows. The candidates are the first model's methods; an
    exploratory setting (a sweep cell, `sft_kl kl_coef=0.3`) is one only once it has the seeds a verdict needs, and
    until then leaves the outcome as it is rather than provisional."""
    first = next(iter(models.values()), [])
    by_model = [{x.label: x for x in rs} for rs in models.values()]
    per = {r.label: [m[r.label] for m in by_model if r.label in m] for r in first}
    core = {label: rs for label, rs in per.items() if " " not in label}
    provisional = not first or any(x.provisional for rs in core.values() for x in rs)
    ok = {
        label: rs
        for label, rs in per.items()
        if all(x.eligible for x in rs) and (label in core or not any(x.provisional for x in rs))
    }

    def best(measure: str) -> str | None:
        won = [label for label, rs in ok.items() if any(getattr(x, measure) == "better" for x in rs)]
        return max(won, key=lambda label: sum(x.general.mean for x in ok[label]) / len(ok[label]), default=None)

    if (m := best("primary")) is not None:
        why = f"better than {ref} on what the model can still do at matched learning, and worse on nothing"
    elif (m := best("secondary")) is not None:
        why = (
            f"no method is better than {ref} on general ability; this one is better on the secondary measures and "
            "worse on none"
        )
    elif current in ok:
        m, why = (
            current,
            f"no method is shown better than {ref} on what the model can still do, nor on the secondary measures; "
            f"the current default is worse on none and costs about what {ref} costs once its reference is cached, so "
            "it stays",
        )
    else:
        m, why = (
            ref,
            f"no method is shown better than {ref}, and the current default ({current}) does not qualify (it does not "
            "learn the task, or is worse on a measure the rule reads)",
        )
    return Decision(m, why, provisional)


def decision_markdown(d: Decision, models: dict[str, list[Row]]) -> str:
    seeds = {name: sorted({x.seeds for x in rs}) for name, rs in models.items()}
    where = "; ".join(
        f"{name}: {s[0] if len(s) == 1 else f'{s[0]}–{s[-1]}'} seed(s) per method"
        if s
        else f"{name}: no method compared with {REF} yet"
        for name, s in seeds.items()
    )
    state = (
        f"**Provisional** — some rows rest on fewer than {VERDICT_SEEDS} seeds ({where}); it decides nothing yet."
        if d.provisional
        else f"Every core method's row rests on {VERDICT_SEEDS} or more seeds ({where})."
    )
    return (
        f"Generated by `make study-report` from the committed records by the rule above "
        f"(`psft_lite/study/verdicts.py`).\n\n**The rule's outcome: `{d.choice}`** — {d.reason}. {state}\n"
    )


def outcome(folders: list[Path]) -> str:
    """The rule's outcome over study folders (the first one's methods the candidates; a missing folder is a model
    not run yet), as the `default` block of docs/study.md."""
    models = {f.name: rows(build_curves(read_records(f))[0]) for f in folders if f.exists()}
    return decision_markdown(decide(models), models)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", type=Path, nargs="+", help="study folders, the first one's methods the candidates")
    ap.add_argument("--doc", type=Path, help=f"write the outcome between the `{BLOCK}` report markers of this page")
    args = ap.parse_args(argv)
    md = outcome(args.folders)
    if args.doc:
        atomic_write_text(args.doc, splice(args.doc.read_text(encoding="utf-8"), md, BLOCK))
        print(f"default: {args.doc}")
    else:
        print(md)


if __name__ == "__main__":
    main()
