"""Compare two runs' metrics.jsonl key by key and step by step (a refactor must leave training unchanged).

    python bench/compare_metrics.py RUN_A RUN_B     # exit 0 when every deterministic value is identical

Timing and memory (step_s, tokens_per_s, peak_mem_mb, eval_s) differ from run to run by nature and are only listed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TIMING = {"step_s", "tokens_per_s", "peak_mem_mb", "eval_s"}


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines() if x.strip()]


def main() -> int:
    a, b = records(Path(sys.argv[1])), records(Path(sys.argv[2]))
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
