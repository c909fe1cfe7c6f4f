"""The default objective's step against sft's, timed in one process with the runs' steps interleaved round by round,
so every ratio is paired under the same machine conditions (separate processes on a shared virtual machine drift by
tens of percent from one to the next).

    python bench/default_speed.py                      # sft, sft_kl (top-k, exact; first epoch, cached), asft, eaft
    python bench/default_speed.py --rounds 12 --length 256 --configs sft,sft_kl,sft_kl-cached

Every configuration trains the embedded SmolLM2-135M-Instruct, LoRA r16 all-linear, micro batch 4 × LENGTH tokens
(half of each sequence trained), dtype auto, on the same synthetic data and seed. Each is warmed up for a whole epoch
(so sft_kl-cached's reference cache is full and measured steps read it); then each round times one step of every
configuration in turn. Printed per configuration: the median step time and, paired with sft's step of the same round,
the median ratio with its range; and the peak RSS of the whole process (shared: the per-configuration memory of
bench/train_step.py, which runs each configuration in its own process). For a configuration that runs the base's
forward in its measured steps (a first epoch), also where that time goes, in sft steps: the base's forward through
the model (adapter off, no gradient) and the base's head with its top-k, so the first epoch's cost can be set against
its floor (the forward's FLOPs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from train_step import BATCH, CONFIGS, peak_mb, synthetic_rows  # noqa: E402


class Timed:
    """Seconds spent in `scoring.base_reference` and, within it, in the base's head and top-k, while active."""

    def __init__(self) -> None:
        from psft_lite.model import scoring

        self.scoring, self.total, self.head = scoring, 0.0, 0.0
        self.reference, self.topk = scoring.base_reference, scoring.reference_topk

    def _wrap(self, fn, field: str):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                setattr(self, field, getattr(self, field) + time.perf_counter() - t0)

        return timed

    def __enter__(self) -> Timed:
        self.scoring.base_reference = self._wrap(self.reference, "total")
        self.scoring.reference_topk = self._wrap(self.topk, "head")
        return self

    def __exit__(self, *exc) -> None:
        self.scoring.base_reference, self.scoring.reference_topk = self.reference, self.topk


def build_run(name: str, data: Path, workdir: Path, steps: int):
    from rich.console import Console

    from psft_lite.recipe.schema import recipe_from_dict
    from psft_lite.training.build import build

    recipe = recipe_from_dict(
        {
            "model": {"name": "smollm2-135m-instruct", "dtype": "auto"},
            "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
            "data": {"train": str(data), "max_length": 4096, "truncation": "truncate", "shuffle": False},
            "objective": CONFIGS[name],
            "train": {"lr": 1e-4, "max_steps": steps, "batch_size": BATCH, "micro_batch_size": BATCH, "seed": 0},
            "guard": {"drift_watch": False},  # its sampled pass would land on some rounds and not others
            "output": {"dir": str(workdir / name)},
        }
    )
    return build(recipe, Console(quiet=True), overwrite=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--configs", default="sft,sft_kl,sft_kl-cached,sft_kl-exact,sft_kl-exact-cached,asft,asft-cached,eaft"
    )
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--examples", type=int, default=16, help="examples per epoch (the warm-up epoch's length)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import torch

    from psft_lite.model import loading
    from psft_lite.training.step import train_step

    names = [n for n in args.configs.split(",") if n]
    if "sft" not in names:
        names.insert(0, "sft")
    torch.manual_seed(0)
    tok = loading.load_tokenizer(loading.ModelSection())
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(args.examples, args.length, tok)))
        epoch = args.examples // BATCH
        total = epoch + args.rounds
        runs = {n: build_run(n, data, Path(tmp), total) for n in names}
        for n, r in runs.items():  # a whole epoch each: caches filled, allocator warm
            for step in range(epoch):
                train_step(r, step)
            print(f"warmed up {n}", file=sys.stderr, flush=True)
        times: dict[str, list[float]] = {n: [] for n in names}
        parts: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
        for k in range(args.rounds):
            for n in names:
                with Timed() as spent:
                    t0 = time.perf_counter()
                    train_step(runs[n], epoch + k)
                    times[n].append(time.perf_counter() - t0)
                parts[n].append((spent.total - spent.head, spent.head))
        r0 = runs["sft"]
        dtype = str(r0.dtype).removeprefix("torch.")
        tokens = sum(r0.data.totals(epoch)[2] for _ in [0])
    print(
        f"micro batch {BATCH} × {args.length} tokens, LoRA r16 all-linear, {dtype} on cpu; {args.rounds} rounds, each "
        f"one step of every configuration in turn, after one epoch of warm-up; peak RSS of the process "
        f"{peak_mb():.0f} MB\n"
    )
    print(f"{'configuration':<20} {'step s (median)':>16} {'tokens/s':>9} {'× sft (median)':>15} {'× sft range':>14}")
    out = {}
    for n in names:
        ratios = [a / b for a, b in zip(times[n], times["sft"])]
        med = statistics.median(times[n])
        out[n] = {
            "step_s": med,
            "tokens_per_s": tokens / med,
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "steps": times[n],
        }
        print(
            f"{n:<20} {med:>16.2f} {tokens / med:>9.0f} {statistics.median(ratios):>15.2f} "
            f"{min(ratios):>6.2f}–{max(ratios):<6.2f}"
        )
    split = [n for n in names if any(f for f, _ in parts[n])]
    if split:
        print("\nthe base's reference in the measured steps, in sft steps of the same round (median):")
        print(f"{'configuration':<20} {'base forward':>13} {'base head + top-k':>18}")
    for n in split:
        fwd = statistics.median(f / b for (f, _), b in zip(parts[n], times["sft"]))
        head = statistics.median(h / b for (_, h), b in zip(parts[n], times["sft"]))
        out[n].update({"base_forward_x_sft": fwd, "base_head_x_sft": head})
        print(f"{n:<20} {fwd:>13.3f} {head:>18.3f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
