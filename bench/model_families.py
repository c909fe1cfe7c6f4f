"""Step time, throughput and peak memory per model family, with and without the chunked LM head.

    python bench/model_families.py                      # SmolLM2-135M and Gemma 3 270M, sft, 6 measured steps
    python bench/model_families.py --models gemma3-270m --steps 10

Each (model, head) runs in its own process on one thread: the quickstart recipe (400 arithmetic problems, batch 4,
micro-batch 4, bf16 where the CPU has it), 2 warm-up steps, then `--steps` measured steps read from the run's
metrics. "unchunked" scores every trained position of a micro-batch in one [rows × vocabulary] block instead of
blocks of 1024 rows; peak memory is the process's peak resident set (VmHWM) on the CPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def worker(model: str, chunked: bool, steps: int, out: Path) -> None:
    from rich.console import Console

    from psft_lite.model import scoring
    from psft_lite.recipe.schema import load_recipe
    from psft_lite.training import trainer

    if not chunked:  # one block for every row: what a plain logits → log_softmax would hold
        scoring.response_logprobs = functools.partial(scoring.response_logprobs, chunk=10**9)
    sets = [f"model.name={model}", f"train.max_steps={steps + 2}", f"output.dir={out}", "eval.final=false"]
    trainer.run(load_recipe(ROOT / "recipes" / "quickstart.toml", sets), console=Console(quiet=True), overwrite=True)


def measure(model: str, chunked: bool, steps: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="psft-families-") as tmp:
        cmd = [sys.executable, __file__, "--worker", model, "--chunked", str(int(chunked)), "--steps", str(steps)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PSFT_BENCH_OUT": tmp}
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode:
            sys.exit(p.stderr[-2000:])
        recs = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines() if '"event"' not in x]
    timed = recs[2:]
    return {
        "model": model,
        "head": "chunked (1024 rows)" if chunked else "unchunked",
        "step_s": statistics.mean(r["step_s"] for r in timed),
        "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in timed),
        "peak_mem_mb": max(r["peak_mem_mb"] for r in recs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m-instruct,gemma3-270m")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--chunked", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, bool(args.chunked), args.steps, Path(os.environ["PSFT_BENCH_OUT"]))
    print("| model | LM head | step (s) | tokens/s | peak memory (MB) |")
    print("|---|---|---|---|---|")
    for model in args.models.split(","):
        for chunked in (True, False):
            r = measure(model, chunked, args.steps)
            print(f"| {model} | {r['head']} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_mem_mb']:.0f} |")


if __name__ == "__main__":
    main()
