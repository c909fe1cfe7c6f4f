"""Compare two runs' metrics.jsonl key by key and step by step (a refactor must leave training unchanged).

    python bench/compare_metrics.py RUN_A RUN_B     # exit 0 when every deterministic value is identical
    python bench/compare_metrics.py RUN_A RUN_B --keys loss,nll,kl_base,entropy   # how far apart, key by key

A run is a run folder or its metrics.jsonl. With --keys, each key's largest difference over the steps both runs
logged is printed, absolute and relative to run B's value (for two runs meant to agree within a tolerance: the top-k
reference against the exact KL, bench/records/quickstart-reference/).

Timing and memory (step_s, tokens_per_s, peak_mem_mb, eval_s) differ from run to run by nature and are only listed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TIMING = {"step_s", "tokens_per_s", "peak_mem_mb", "eval_s"}


def records(run: Path) -> list[dict]:
    path = Path(run) if Path(run).is_file() else Path(run) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def distances(a: list[dict], b: list[dict], keys: list[str]) -> int:
    steps = {r["step"]: r for r in b if "step" in r and "loss" in r}
    pairs = [(x, steps[x["step"]]) for x in a if "loss" in x and x.get("step") in steps]
    print(f"{len(pairs)} steps in both runs")
    print(f"{'key':<12} {'max |A − B|':>12} {'at step':>8} {'max |A − B| / |B|':>18} {'at step':>8}")
    for k in keys:
        d = [(abs(x[k] - y[k]), abs(x[k] - y[k]) / abs(y[k]) if y[k] else 0.0, x["step"]) for x, y in pairs if k in x]
        if not d:
            print(f"{k:<12} (not logged)")
            continue
        ab, rel = max(d), max(d, key=lambda t: t[1])
        print(f"{k:<12} {ab[0]:>12.5f} {ab[2]:>8} {100 * rel[1]:>17.2f}% {rel[2]:>8}")
    return 0


def main() -> int:
    a, b = records(Path(sys.argv[1])), records(Path(sys.argv[2]))
    if len(sys.argv) > 4 and sys.argv[3] == "--keys":
        return distances(a, b, sys.argv[4].split(","))
    diffs = []
    if len(a) != len(b):
        diffs.append(f"{len(a)} vs {len(b)} records")
    for i, (x, y) in enumerate(zip(a, b)):
        if set(x) != set(y):
            diffs.append(f"record {i + 1}: keys differ: {sorted(set(x) ^ set(y))}")
        for k in sorted((set(x) & set(y)) - TIMING):
            if x[k] != y[k]:
                diffs.append(f"record {i + 1} ({x.get('step')}): {k} {x[k]!r} vs {y[k]!r}")
    keys = sorted({k for r in a for k in r})
    print(f"{len(a)} records, {len(keys)} keys ({', '.join(keys)}); timing keys not compared: {sorted(TIMING)}")
    print("\n".join(diffs[:20]) if diffs else "identical: every deterministic key at every step")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
