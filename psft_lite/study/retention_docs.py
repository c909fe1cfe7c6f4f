"""The generated tables of docs/retention.md, from committed records only: the suite's calibration on the base model
(its own verdict against itself), the teeth checks, and the drop the suite detects.

    python -m psft_lite.study.retention_docs docs/retention/teeth --doc docs/retention.md    # = make retention-docs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from psft_lite.core.files import atomic_write_text
from psft_lite.core.stats import detectable_drop
from psft_lite.study.blocks import splice

CHECKS = {  # folder → what the run was built to show
    "damaged": "sft at lr 1e-2 on 400 problems in a new format, 100 steps, loss watchdog off: built to damage",
    "gentle": "the same at lr 1e-6: barely moves",
    "base": "the base model against itself",
}
SCORING = {"choice": "multiple choice, log-likelihood", "check": "greedy reply, strict verifier"}


def read(folder: Path) -> dict[str, dict[str, Any]]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(folder.glob("*/retention.json"))}


def _signed(x: float) -> str:
    return f"{x:+.1f}"


def calibration_table(base: dict[str, Any]) -> str:
    """Per kind: items, how it is scored, the base model's accuracy and chance."""
    from psft_lite.inference.retention import load_suite

    scored = {it.kind: it.score for it in load_suite()}
    lines = ["| kind | items | scored by | base accuracy % | chance % |", "|---|---|---|---|---|"]
    for kind, c in base["kinds"].items():
        lines.append(f"| {kind} | {c['n']} | {SCORING[scored[kind]]} | {c['before']:.1f} | {c['chance']:.0f} |")
    o = base["overall"]
    lines.append(f"| **all** | **{o['n']:,}** | | **{o['before']:.1f}** | |")
    return "\n".join(lines)


def teeth_table(records: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| check | general ability before → after | change, points [95 % interval] | right→wrong | wrong→right | KL |",
        "|---|---|---|---|---|---|",
    ]
    for name, what in CHECKS.items():
        if name not in records:
            continue
        o, kl = records[name]["overall"], records[name]["kl_to_base"]
        lines.append(
            f"| {name}: {what} | {o['before']:.1f} % → {o['after']:.1f} % | {_signed(o['delta'])} "
            f"[{_signed(o['low'])}, {_signed(o['high'])}] | {o['right_to_wrong']} | {o['wrong_to_right']} | {kl:.3f} |"
        )
    return "\n".join(lines)


def power_table(n: int) -> str:
    lines = ["| items that change (right→wrong + wrong→right) | smallest drop detected with 80 % power |", "|---|---|"]
    for d in (0.02, 0.05, 0.10, 0.20):
        lines.append(f"| {d:.0%} | {detectable_drop(n, d):.1f} points |")
    return "\n".join(lines)


def blocks(folder: Path) -> dict[str, str]:
    records = read(folder)
    base = records["base"]
    return {
        "retention-calibration": calibration_table(base),
        "retention-teeth": teeth_table(records),
        "retention-power": power_table(base["overall"]["n"]),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--doc", type=Path, required=True)
    args = ap.parse_args(argv)
    doc = args.doc.read_text(encoding="utf-8")
    for name, block in blocks(args.folder).items():
        doc = splice(doc, block + "\n", name)
    atomic_write_text(args.doc, doc)
    print(f"tables: {args.doc}")


if __name__ == "__main__":
    main()
