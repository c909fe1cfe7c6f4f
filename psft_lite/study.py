"""`psft-lite study`: train every objective on the same recipe for several epochs and seeds, evaluate each
epoch-end checkpoint, and report — the replication study of docs/study.md, rerunnable on any model.

Each (method, seed) is an ordinary run in OUT/<method>-s<seed>/ with a checkpoint at every epoch end; evaluations
are appended to OUT/results.jsonl as they finish. Rerunning skips finished runs and evaluations and resumes an
interrupted run from its newest checkpoint.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from psft_lite import modeling
from psft_lite.checkpoint import list_checkpoints
from psft_lite.errors import RecipeError
from psft_lite.logprobs import kl_divergence
from psft_lite.metrics import read_metrics
from psft_lite.objectives import methods
from psft_lite.recipe import Recipe, recipe_from_dict

#: Each method is a set of objective.* settings (objectives.py's table); everything else (lr, batch, steps, seed) is
#: shared.
METHODS: dict[str, dict[str, Any]] = methods()
PROBE = "probe"  # the eval set measuring forgetting: accuracy, NLL and KL to the base model


def method_recipe(base: Recipe, method: str, seed: int, run_dir: Path, steps_per_epoch: int) -> Recipe:
    raw = base.model_dump(mode="json", exclude_none=True)
    raw["objective"] = {**raw["objective"], **METHODS[method]}
    raw["train"].update(seed=seed, save_every=steps_per_epoch, keep_last=0)
    raw["eval"]["every"] = 0
    raw["output"] = {**raw["output"], "dir": str(run_dir)}
    return recipe_from_dict(raw, source=f"study:{method}")


@torch.no_grad()
def kl_to_base(loaded: Any, items: list[Any]) -> float:
    """Mean over reference tokens of KL(p_base ‖ p_model), teacher-forced on the probe's reference answers."""
    from psft_lite.data.batching import collate
    from psft_lite.data.tokenize import encode_all

    if not loaded.has_adapter:
        return 0.0
    convs = [(it.prompt + [{"role": "assistant", "content": it.reference}], it.where) for it in items]
    examples, _ = encode_all(loaded.tokenizer, convs, 512, "truncate")
    head = modeling.lm_head(loaded.model)
    total, count = 0.0, 0
    for start in range(0, len(examples), 8):
        chunk = examples[start : start + 8]
        b = collate(chunk, list(range(start, start + len(chunk))), loaded.tokenizer.pad_token_id).to(loaded.device)
        with modeling.autocast(loaded.device, loaded.dtype):
            tuned = modeling.response_hidden(loaded.model, b)
            with loaded.model.disable_adapter():
                base = modeling.response_hidden(loaded.model, b)
        kl = kl_divergence(base, tuned, head.weight, head.bias, softcap=head.softcap, scale=head.scale)
        total += float(kl.sum())
        count += kl.numel()
    return total / max(count, 1)


def evaluate_model(spec: str | Path, sets: dict[str, Any], limit: int, max_new_tokens: int) -> dict[str, Any]:
    from psft_lite.evaluate import evaluate_set
    from psft_lite.generate import load_model

    loaded = load_model(spec)
    out: dict[str, Any] = {}
    for name, items in sets.items():
        summary, _ = evaluate_set(loaded, items[:limit], max_new_tokens=max_new_tokens, batch_size=32)
        out[name] = {k: summary[k] for k in ("accuracy", "mean_entropy", "mean_nll", "n")}
        if name == PROBE:
            out[name]["kl_to_base"] = kl_to_base(loaded, items[:limit])
    return out


def run_study(
    recipe: Recipe, methods: list[str], seeds: list[int], out: Path, limit: int, max_new_tokens: int, console: Console
) -> Path:
    """Train and evaluate everything that is not done yet; returns OUT/results.jsonl."""
    from psft_lite import train
    from psft_lite.data import load_examples
    from psft_lite.evaluate import eval_items

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise RecipeError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}.")
    if not recipe.eval.sets:
        raise RecipeError("the study recipe needs eval.sets (e.g. in_domain, ood and probe) to evaluate each epoch on.")
    epochs = int(recipe.train.epochs)
    if recipe.train.max_steps is not None or epochs != recipe.train.epochs:
        raise RecipeError(
            "a study trains whole epochs: set train.epochs to an integer and leave train.max_steps unset."
        )
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    done = {(rec["method"], rec["seed"], rec["epoch"]) for rec in _read(results_path)}
    tokenizer = modeling.load_tokenizer(recipe.model)
    base_dir = recipe.path.parent if recipe.path else None
    examples, _ = load_examples(recipe.data.train, recipe.data, tokenizer, limit=recipe.data.limit, base_dir=base_dir)
    steps_per_epoch = math.ceil(len(examples) / recipe.train.batch_size)
    sets = {name: eval_items(src, recipe.data, base_dir=base_dir) for name, src in recipe.eval.sets.items()}
    runs = [(m, s) for m in methods for s in seeds]
    to_train = [(m, sd) for m, sd in runs if not _trained(out / f"{m}-s{sd}")]
    n_steps = len(to_train) * epochs * steps_per_epoch  # an interrupted run counts whole: a rough upper bound
    evals = {(m, sd, e) for m, sd in runs for e in range(1, epochs + 1)} | {("base", 0, 0)}
    n_evals = len(evals - done)
    plan = f"study: {len(methods)} method(s) × {len(seeds)} seed(s) × {epochs} epochs of {steps_per_epoch} steps"
    if n_steps:
        t_step = _time_one_step(recipe, console)
        plan += f"; to do: {n_steps} steps at ~{t_step:.1f} s/step ≈ {n_steps * t_step * 1.15 / 60:.0f} min"
    console.print(
        plan + f"; {n_evals} evaluation(s) of {sum(min(len(v), limit) for v in sets.values())} problems to do"
    )
    t0 = time.perf_counter()
    if ("base", 0, 0) not in done:
        _append(
            results_path,
            {
                "method": "base",
                "seed": 0,
                "epoch": 0,
                "step": 0,
                **evaluate_model(recipe.model.name, sets, limit, max_new_tokens),
            },
        )
    for method, seed in runs:
        run_dir = out / f"{method}-s{seed}"
        run_recipe = method_recipe(recipe, method, seed, run_dir, steps_per_epoch)
        if not _trained(run_dir):
            resume = "latest" if list_checkpoints(run_dir) else None
            console.print(f"[bold]{method}[/bold] seed {seed}: " + ("resuming" if resume else "training"))
            train.run(run_recipe, console=console, overwrite=resume is None, resume=resume)
        for step, ckpt in list_checkpoints(run_dir):
            epoch = step // steps_per_epoch
            if step % steps_per_epoch or (method, seed, epoch) in done:
                continue
            scores = evaluate_model(ckpt, sets, limit, max_new_tokens)
            _append(
                results_path,
                {
                    "method": method,
                    "seed": seed,
                    "epoch": epoch,
                    "step": step,
                    "train_entropy": _train_entropy(run_dir, step, steps_per_epoch),
                    **scores,
                },
            )
            done.add((method, seed, epoch))
        console.print(f"  done {method} seed {seed} ({(time.perf_counter() - t0) / 60:.0f} min so far)")
    return results_path


def _trained(run_dir: Path) -> bool:
    """The run finished: its final adapter exists."""
    return (run_dir / "adapter" / "adapter_config.json").is_file()


def _time_one_step(recipe: Recipe, console: Console) -> float:
    """Seconds per optimizer step, measured on one step of the recipe (model load excluded)."""
    from psft_lite import train

    raw = recipe.model_dump(mode="json", exclude_none=True)
    raw["output"]["dir"] = str(Path("/tmp") / f"psft-lite-study-probe-{id(recipe)}")
    run = train.build(recipe_from_dict(raw), Console(quiet=True), overwrite=True)
    train.train_step(run, 0)  # warm-up
    t0 = time.perf_counter()
    train.train_step(run, 1)
    return time.perf_counter() - t0


def _train_entropy(run_dir: Path, step: int, steps_per_epoch: int) -> float | None:
    """Mean entropy on trained tokens over the epoch that ended at `step`."""
    steps = [
        rec
        for rec in read_metrics(run_dir / "metrics.jsonl")
        if "event" not in rec and step - steps_per_epoch < rec["step"] <= step
    ]
    return statistics.mean(rec["entropy"] for rec in steps) if steps else None


def _read(path: Path) -> list[dict[str, Any]]:
    return read_metrics(path) if path.exists() else []


def _append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# Report


def _cell(values: list[float], pct: bool) -> str:
    if not values:
        return "—"
    scale = 100 if pct else 1
    m = statistics.mean(values) * scale
    if len(values) == 1:
        return f"{m:.1f}" if pct else f"{m:.3f}"
    spread = (max(values) - min(values)) * scale / 2
    return f"{m:.1f} ± {spread:.1f}" if pct else f"{m:.3f} ± {spread:.3f}"


def latest_results(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (method, seed, epoch), the last written (study processes run side by side may repeat one)."""
    return list({(rec["method"], rec["seed"], rec["epoch"]): rec for rec in results}.values())


def report_tables(results: list[dict[str, Any]], sets: list[str]) -> str:
    """One markdown table per epoch end: mean ± half-range over seeds."""
    epochs = sorted({rec["epoch"] for rec in results if rec["method"] != "base"})
    methods = ["base"] + [m for m in METHODS if any(rec["method"] == m for rec in results)]
    cols = [f"{s} acc %" for s in sets] + ["train entropy", f"{PROBE} NLL", f"{PROBE} KL to base"]
    out = []
    for epoch in epochs:
        out.append(f"#### Epoch {epoch}\n\n| method | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
        for m in methods:
            rows = [rec for rec in results if rec["method"] == m and (rec["epoch"] == epoch or m == "base")]
            if not rows:
                continue
            cells = [_cell([rec[s]["accuracy"] for rec in rows if s in rec], True) for s in sets]
            cells.append(_cell([rec["train_entropy"] for rec in rows if rec.get("train_entropy") is not None], False))
            cells.append(_cell([rec[PROBE]["mean_nll"] for rec in rows if PROBE in rec], False))
            cells.append(_cell([rec[PROBE].get("kl_to_base", 0.0) for rec in rows if PROBE in rec], False))
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plot_study(results: list[dict[str, Any]], out_dir: Path, run_root: Path, sets: list[str]) -> list[Path]:
    """Entropy vs step (seed 0 of every method); accuracy per set and the probe's KL to base vs epoch (mean over
    seeds), as small PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for m in METHODS:
        run = run_root / f"{m}-s0"
        if (run / "metrics.jsonl").exists():
            recs = [rec for rec in read_metrics(run / "metrics.jsonl") if "event" not in rec]
            ax.plot(
                [rec["step"] for rec in recs],
                [rec["entropy"] for rec in recs],
                label=m,
                linewidth=1,
                color=f"C{list(METHODS).index(m)}",
            )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("entropy on trained tokens (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "study-entropy.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    panels = [*sets, "kl"] if PROBE in sets else list(sets)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
    base = next((rec for rec in results if rec["method"] == "base"), None)

    def value(rec: dict[str, Any], panel: str) -> float:
        return rec[PROBE].get("kl_to_base", 0.0) if panel == "kl" else rec[panel]["accuracy"] * 100

    for ax, s in zip(axes[0], panels):
        for m in METHODS:
            rows = [rec for rec in results if rec["method"] == m]
            epochs = sorted({rec["epoch"] for rec in rows})
            if not epochs:
                continue
            ys = [statistics.mean(value(rec, s) for rec in rows if rec["epoch"] == e) for e in epochs]
            if base:
                epochs, ys = [0, *epochs], [value(base, s), *ys]
            ax.plot(epochs, ys, marker="o", markersize=3, label=m, color=f"C{list(METHODS).index(m)}")
        ax.set_title(f"{PROBE}: KL to base (nats/token)" if s == "kl" else f"{s} accuracy (%)", fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "study-accuracy.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths
