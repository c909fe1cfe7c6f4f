"""Replay finished runs' metrics.jsonl through today's guard: when (if ever) would each warning fire?

    python bench/guard_replay.py runs/*/                  # run folders, and the runs inside study folders
    python bench/guard_replay.py runs/quickstart --set entropy_floor=0.25

Tuning the entropy watch against real trajectories: per run it prints the entropy
EMA as a fraction of its start every 20 steps, and the step and message of each warning the current `[guard]`
settings (or the ones given with --set) would give. The recorded `drift` values feed the drift watch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from psft_lite.recipe.schema import GuardSection, ObjectiveSection, tomllib  # tomli on Python 3.10
from psft_lite.tracking.metrics import read_metrics
from psft_lite.training.guard import Guard
from psft_lite.training.objectives import method_name


def replay(run: Path, cfg: GuardSection) -> tuple[list[float], list[dict]]:
    """The entropy EMA as a fraction of its start, per step, and the guard's events, for the run's own method."""
    objective = ObjectiveSection(**tomllib.loads((run / "recipe.toml").read_text())["objective"])
    steps = [r for r in read_metrics(run / "metrics.jsonl") if "event" not in r and "entropy" in r]
    guard, events = Guard(cfg, total_steps=len(steps), method=method_name(objective)), []
    for r in steps:
        events += guard.observe(r, None)
    return [e / guard.baseline for e in guard.ema_history] if guard.baseline else [], events


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--set", action="append", default=[], help="guard.KEY=VALUE override (repeatable)")
    args = ap.parse_args()
    try:
        cfg = GuardSection(**{k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)})
    except (ValueError, TypeError) as e:  # pydantic's ValidationError is a ValueError; so is a bad JSON value
        print(
            f"--set {' '.join(args.set)}: {e}\nUse guard keys with JSON values, e.g. entropy_floor=0.25.",
            file=sys.stderr,
        )
        sys.exit(2)
    # a run folder, or a study folder holding runs
    runs = [r for a in args.runs for r in ([a] if (a / "metrics.jsonl").is_file() else sorted(a.glob("*/")))]
    for run in runs:
        if not (run / "metrics.jsonl").is_file() or not (run / "recipe.toml").is_file():
            print(f"{run}: no metrics.jsonl and recipe.toml here: not a run folder, skipped")
            continue
        trajectory, events = replay(run, cfg)
        print(f"{run}: entropy EMA / start every 20 steps: " + " ".join(f"{x:.2f}" for x in trajectory[::20]))
        for e in events or [{"step": "—", "message": "no warning"}]:
            print(f"    {e['message'][:170]}")


if __name__ == "__main__":
    main()
