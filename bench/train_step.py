"""Training-step benchmark: psft-lite's objectives against each other and against TRL's SFTTrainer.

    python bench/train_step.py                 # headline table (micro batch 4 × 256 tokens) + length sweep
    python bench/train_step.py --json out.json --no-sweep
    python bench/train_step.py --no-trl        # without TRL (install it with: pip install 'psft-lite[bench]')

Every configuration runs in its own process (peak RSS is per process), on the embedded SmolLM2-135M-Instruct,
LoRA r=16 all-linear, bf16 where the hardware supports it, the same synthetic data and seed. Each runs `--warmup`
steps, then `--steps` measured steps; the step time is their mean (psft snapshot's refreshes included: measured
steps span whole groups of K). Peak memory is RSS on CPU (VmHWM, reset after loading) or peak allocated on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIGS = {
    "sft": {"kind": "sft"},
    # the default (the base's top-k reference), as in a run's first epoch (the base's forward every step) and after
    # it (its top-k cached); then the same with the exact KL over the full vocabulary (reference_top_k = 0)
    "sft_kl": {"kind": "sft_kl", "reference_cache_mb": 0},
    "sft_kl-cached": {"kind": "sft_kl"},
    "sft_kl-exact": {"kind": "sft_kl", "reference_top_k": 0, "reference_cache_mb": 0},
    "sft_kl-exact-cached": {"kind": "sft_kl", "reference_top_k": 0},
    "asft": {"kind": "asft", "reference_cache_mb": 0},
    "asft-cached": {"kind": "asft"},
    "eaft": {"kind": "eaft"},
    "psft-snapshot-K8": {"kind": "psft", "old_policy": "snapshot", "refresh_every": 8},
    "psft-base": {"kind": "psft", "old_policy": "base"},
    "idft": {"kind": "idft"},
}
BATCH = 4


# ---------------------------------------------------------------------------------------------------------------------
# Data: prompt/completion rows of exactly `length` tokens (arithmetic problems concatenated, then truncated)


def synthetic_rows(n: int, length: int, tokenizer) -> list[dict]:
    from psft_lite.data.arith import IN_DOMAIN, generate

    problems = generate(n * (length // 40 + 4), IN_DOMAIN, seed=7)
    rows, k = [], 0
    for _ in range(n):
        prompt, completion = [], []
        while True:
            p = problems[k % len(problems)]
            k += 1
            prompt.append(p["prompt"])
            completion.append(p["completion"])
            text = tokenizer.apply_chat_template(
                [
                    {"role": "user", "content": " ".join(prompt[:2])},
                    {"role": "assistant", "content": "\n".join(completion)},
                ],
                tokenize=False,
            )
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) > length + 8:
                break
        rows.append({"prompt": " ".join(prompt[:2]), "completion": "\n".join(completion)})
    return rows


def reset_peak() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) on Linux
    except OSError:
        pass


def peak_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------------------------------
# Workers (one process each)


def worker_psft_lite(name: str, length: int, warmup: int, steps: int, workdir: Path) -> dict:
    import torch
    from rich.console import Console

    from psft_lite.model import loading
    from psft_lite.recipe.schema import recipe_from_dict
    from psft_lite.training.build import build
    from psft_lite.training.step import train_step

    torch.manual_seed(0)
    tok = loading.load_tokenizer(loading.ModelSection())
    n_steps = warmup + steps
    n_examples = BATCH * warmup  # psft-base, sft_kl-cached: the warm-up epoch fills their caches, measured steps read
    rows = synthetic_rows(max(n_examples, BATCH * steps), length, tok)
    data = workdir / f"data-{length}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = recipe_from_dict(
        {
            "model": {"name": "smollm2-135m-instruct", "dtype": "auto"},
            "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
            "data": {"train": str(data), "max_length": length, "truncation": "truncate", "shuffle": False},
            "objective": CONFIGS[name],
            "train": {"lr": 1e-4, "max_steps": n_steps, "batch_size": BATCH, "micro_batch_size": BATCH, "seed": 0},
            "output": {"dir": str(workdir / name)},
        }
    )
    r = build(recipe, Console(quiet=True), overwrite=True)
    reset_peak()
    times, tokens = [], []
    for step in range(n_steps):
        t0 = time.perf_counter()
        rec = train_step(r, step)
        if r.device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
            tokens.append(rec["tokens"])
    step_s = statistics.mean(times)
    return {
        "name": name,
        "length": length,
        "tokens_per_s": sum(tokens) / sum(times),
        "step_s": step_s,
        "peak_mem_mb": peak_mb(),
        "dtype": str(r.dtype).removeprefix("torch."),
        "device": r.device.type,
    }


def worker_trl(length: int, warmup: int, steps: int, workdir: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from psft_lite.model import loading, runtime

    path = loading.embedded_model_dir()
    device = runtime.resolve_device("auto")
    dtype = runtime.resolve_dtype("auto", device)
    tok = loading.load_tokenizer(loading.ModelSection())
    rows = synthetic_rows(BATCH * (warmup + steps), length, tok)
    ds = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "completion": [{"role": "assistant", "content": r["completion"]}],
            }
            for r in rows
        ]
    )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    times: list[float] = []
    tokens: list[int] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()
            if state.global_step == warmup:
                reset_peak()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if state.global_step > warmup:
                times.append(time.perf_counter() - self.t0)

    cfg = SFTConfig(
        output_dir=str(workdir / "trl"),
        max_length=length,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        learning_rate=1e-4,
        max_steps=warmup + steps,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        bf16=dtype == torch.bfloat16,
        use_cpu=device.type == "cpu",
        dataloader_num_workers=0,
        packing=False,
        gradient_checkpointing=False,
        seed=0,
        disable_tqdm=True,
    )
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    trainer = SFTTrainer(
        model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=lora, callbacks=[Timer()]
    )
    reset_peak()
    trainer.train()
    batch_tokens = BATCH * length
    tokens = [batch_tokens] * len(times)
    return {
        "name": "trl-sft",
        "length": length,
        "tokens_per_s": sum(tokens) / sum(times),
        "step_s": statistics.mean(times),
        "peak_mem_mb": peak_mb(),
        "dtype": str(dtype).removeprefix("torch."),
        "device": device.type,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Driver


def run_worker(name: str, length: int, warmup: int, steps: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        name,
        "--length",
        str(length),
        "--warmup",
        str(warmup),
        "--steps",
        str(steps),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = "\n".join(p.stderr.strip().splitlines()[-5:])
        return {"name": name, "length": length, "error": tail or f"exit {p.returncode}"}
    return json.loads(lines[-1])


def table(records: list[dict], base: dict | None) -> str:
    """The records as a table; ratios are against sft when it was measured (— otherwise)."""
    out = [f"{'configuration':<18} {'tokens/s':>9} {'step s':>8} {'peak MB':>9} {'step ×sft':>10} {'mem ×sft':>9}"]
    for r in records:
        if "error" in r:
            out.append(f"{r['name']:<18} failed: {r['error'].splitlines()[-1]}")
            continue
        out.append(
            f"{r['name']:<18} {r['tokens_per_s']:>9.0f} {r['step_s']:>8.2f} {r['peak_mem_mb']:>9.0f} "
            + (
                f"{r['step_s'] / base['step_s']:>10.2f} {r['peak_mem_mb'] / base['peak_mem_mb']:>9.2f}"
                if base
                else f"{'—':>10} {'—':>9}"
            )
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", type=Path, help="Also write the records as JSON here.")
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--sweep-lengths", default="256,1024,2048")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="Comma-separated psft-lite configurations.")
    ap.add_argument(
        "--repeat", type=int, default=1, help="Measure every configuration N times, interleaved; report the fastest."
    )
    args = ap.parse_args()
    if args.worker:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            if args.worker == "trl-sft":
                rec = worker_trl(args.length, args.warmup, args.steps, Path(tmp))
            else:
                rec = worker_psft_lite(args.worker, args.length, args.warmup, args.steps, Path(tmp))
        print(json.dumps(rec))
        return

    names = [n for n in args.configs.split(",") if n] + ([] if args.no_trl else ["trl-sft"])
    best: dict[str, dict] = {}
    for _ in range(args.repeat):  # interleaved, so drifting machine load hits every configuration alike
        for name in names:
            print(f"running {name} ({args.length} tokens) ...", file=sys.stderr, flush=True)
            rec = run_worker(name, args.length, args.warmup, args.steps)
            if name not in best or ("error" not in rec and rec["step_s"] < best[name].get("step_s", float("inf"))):
                best[name] = rec
    records = [best[n] for n in names]
    base = next((r for r in records if r["name"] == "sft" and "error" not in r), None)
    ok = next((r for r in records if "error" not in r), {})
    print(
        f"\nmicro batch {BATCH} × {args.length} tokens, LoRA r16 all-linear, {ok.get('dtype')} on {ok.get('device')} "
        f"({os.cpu_count()} cores); mean of {args.steps} steps after {args.warmup} warm-up steps\n"
    )
    print(table(records, base))
    trl = next((r for r in records if r["name"] == "trl-sft" and "error" not in r), None)
    if trl and base:
        print(
            f"\npsft-lite sft vs TRL SFTTrainer: {base['tokens_per_s'] / trl['tokens_per_s']:.2f}× tokens/s, "
            f"{base['peak_mem_mb'] / trl['peak_mem_mb']:.2f}× peak memory"
        )
    sweep = []
    if not args.no_sweep:
        print("\nlength sweep: peak memory (MB) of one micro batch of 4 × L tokens, 2 steps each", file=sys.stderr)
        for length in [int(x) for x in args.sweep_lengths.split(",")]:
            row = {}
            for name in ("sft", "psft-snapshot-K8", "idft"):
                print(f"running {name} ({length} tokens) ...", file=sys.stderr, flush=True)
                rec = run_worker(name, length, 1, 1)
                rec["sweep"] = True
                sweep.append(rec)
                row[name] = rec
            s = row["sft"].get("peak_mem_mb")
            cells = "  ".join(
                f"{n} {r.get('peak_mem_mb', float('nan')):>6.0f} ({r.get('peak_mem_mb', float('nan')) / s:.2f}×)"
                for n, r in row.items()
            )
            print(f"L={length:<5} {cells}")
    if args.json:
        args.json.write_text(json.dumps(records + sweep, indent=2) + "\n")
        print(f"\nwrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
