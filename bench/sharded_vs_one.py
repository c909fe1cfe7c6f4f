"""Sharded (FSDP), data-parallel (DDP) and one-process training of the same recipe, side by side: per-step losses and
grad norms, and each run's peak memory per process against the preflight estimate.

    python bench/sharded_vs_one.py            # the embedded model, quickstart data and recipe (micro-batch 2), 8 steps
    python bench/sharded_vs_one.py --steps 4 --set objective.kind=sft

Every process runs on one thread. On the CPU, "peak memory" is the process's peak resident set (Python, torch and the
model included), the estimate the same `preflight.estimate_memory` that `psft-lite validate` prints.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run(
    recipe: Path, out: Path, procs: int, strategy: str, steps: int, overrides: list[str], micro: int = 2
) -> list[dict]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    cmd = (launcher if procs > 1 else [sys.executable]) + ["-m", "psft_lite", "train", str(recipe)]
    sets = [f"output.dir={out}", f"train.max_steps={steps}", f"train.strategy={strategy}", "eval.final=false"]
    sets += [f"train.micro_batch_size={micro}"]  # two processes need whole micro-batches of the global batch of 4
    for s in sets + overrides:
        cmd += ["--set", s]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    if p.returncode:
        sys.exit(p.stderr[-3000:])
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"event"' not in x]


def estimates(recipe_path: Path, overrides: list[str]) -> dict[int, float]:
    import torch

    from psft_lite.data import load_examples
    from psft_lite.model import loading, runtime
    from psft_lite.recipe.schema import load_recipe
    from psft_lite.training.preflight import estimate_memory

    recipe = load_recipe(recipe_path, ["train.micro_batch_size=2", *overrides])
    src = loading.resolve_source(recipe.model)
    tok = loading.load_tokenizer(recipe.model, src)
    examples, _ = load_examples(
        recipe.data.train, recipe.data, tok, limit=recipe.data.limit, base_dir=recipe_path.parent
    )
    longest = max(examples, key=len)
    dtype = runtime.resolve_dtype(recipe.model.dtype, torch.device("cpu"))
    est = {n: estimate_memory(recipe, src, torch.device("cpu"), dtype, len(longest), longest.n_trained, shards=n)
           for n in (1, 2)}  # fmt: skip
    return {n: e.total / 2**20 for n, e in est.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "quickstart.toml")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="psft-sharded-") as tmp:
        runs = {
            "1 process": run(args.recipe, Path(tmp) / "one", 1, "auto", args.steps, args.overrides),
            # the same math in another order: how far rounding alone moves a run (large in bf16, nil in fp32)
            "1 process, micro-batch 1": run(args.recipe, Path(tmp) / "mb1", 1, "auto", args.steps, args.overrides, 1),
            "2 × DDP": run(args.recipe, Path(tmp) / "ddp", 2, "ddp", args.steps, args.overrides),
            "2 × FSDP": run(args.recipe, Path(tmp) / "fsdp", 2, "fsdp", args.steps, args.overrides),
        }
    est = estimates(args.recipe, args.overrides)
    names = list(runs)
    print("| step | " + " | ".join(f"{n} loss (grad norm)" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for i in range(args.steps):
        print(
            f"| {i + 1} | "
            + " | ".join(f"{runs[n][i]['loss']:.6f} ({runs[n][i]['grad_norm']:.4f})" for n in names)
            + " |"
        )
    print()
    for n in names[1:]:
        worst = max(abs(runs[n][i]["loss"] - runs["1 process"][i]["loss"]) for i in range(args.steps))
        print(f"largest |Δloss| of {n} against 1 process (micro-batch 2): {worst:.2e}")
    print("\n| run | peak memory per process (MB) | estimate (MB) | step time (s, median) |")
    print("|---|---|---|---|")
    for n, recs in runs.items():
        shards = 2 if "FSDP" in n else 1
        if "micro-batch 1" in n:
            continue
        step_s = sorted(r["step_s"] for r in recs)[len(recs) // 2]
        print(f"| {n} | {max(r['peak_mem_mb'] for r in recs):.0f} | {est[shards]:.0f} | {step_s:.2f} |")


if __name__ == "__main__":
    main()
