"""What live reporting costs: the quickstart recipe with no tracker vs each tracker vs all four.

    python bench/trackers.py                   # 30 steps per configuration
    python bench/trackers.py --steps 20 --configs none,all

Each configuration is a real `psft-lite train` in its own process (trackers keep process-wide state), on the embedded
SmolLM2-135M-Instruct, the quickstart recipe cut to `--steps` steps. Reported: the median optimizer step time over
the steps after the first 5 (from metrics.jsonl, so it includes the reporting done inside the step loop) and the
wall time of the whole command (start-up and the trackers' set-up and shutdown included). Run it with nothing else
running on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "none": "none",
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "trackio": "trackio",
    "all": "tensorboard,wandb,mlflow,trackio",
}


def run(config: str, steps: int, out: Path) -> dict[str, float]:
    run_dir = out / config
    t0 = time.perf_counter()
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "psft_lite",
            "train",
            str(ROOT / "recipes" / "quickstart.toml"),
            "--overwrite",
            "--report-to",
            CONFIGS[config],
            "--set",
            f"train.max_steps={steps}",
            "--set",
            f"output.dir={run_dir}",
            "--set",
            "eval.every=0",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")},
    )
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"{config}: exit {p.returncode}\n{p.stderr[-2000:]}")
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_s = [r["step_s"] for r in recs if "event" not in r][5:]
    return {"step_s": statistics.median(step_s), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    results = {}
    with tempfile.TemporaryDirectory(prefix="psft-bench-trackers-") as tmp:
        for name in names:
            results[name] = run(name, args.steps, Path(tmp))
            print(f"{name:12s} median step {results[name]['step_s']:.3f} s   wall {results[name]['wall_s']:.1f} s")
    if "none" in results:
        base = results["none"]
        print(f"\n| trackers | median step s | × none | wall s ({args.steps} steps) | + vs none |")
        print("|---|---|---|---|---|")
        for name, r in results.items():
            print(
                f"| {name} | {r['step_s']:.3f} | {r['step_s'] / base['step_s']:.3f} | {r['wall_s']:.1f} | "
                f"{r['wall_s'] - base['wall_s']:+.1f} s |"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
