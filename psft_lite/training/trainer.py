"""`psft-lite train`: build a run, start or resume it, loop, then write the adapter and the outputs `output.save`
asks for. Rank-aware: rank 0 touches the files, every rank waits for it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from psft_lite import __version__
from psft_lite.core import rundir
from psft_lite.core.errors import Interrupted, RecipeError, RunError
from psft_lite.core.files import atomic_write_text
from psft_lite.exporting import outputs
from psft_lite.inference import retention
from psft_lite.model import scoring
from psft_lite.recipe.schema import Recipe
from psft_lite.tracking.metrics import peak_memory_mb, run_outcome, truncate_metrics
from psft_lite.tracking.trackers import Reporter, flat_config, open_reporter, where
from psft_lite.training import checkpoint, distributed, sharding
from psft_lite.training.build import Run, build
from psft_lite.training.distributed import Dist
from psft_lite.training.loop import final_eval, train_loop
from psft_lite.training.result import TrainResult


def prepare_run_dir(run: Run) -> None:
    """Create (or, with --overwrite, replace) the run directory and write the resolved recipe into it (rank 0)."""
    run.dist.barrier()  # every rank has checked output.dir before rank 0 changes it
    if run.dist.is_main:
        n = sum(p.numel() for p in scoring.trainable_parameters(run.model))
        rundir.create_run_dir(
            run.run_dir, run.recipe.to_toml(), checkpoint.checkpoint_size(n), run.recipe.train.keep_last
        )
    run.dist.barrier()


def resume_point(run: Run, spec: str) -> tuple[int, int]:
    """Load the checkpoint `spec` names into the run; returns the number of steps it had completed and the last step
    the interrupted run had reported (its metrics.jsonl went further than the checkpoint if it was killed)."""
    path, warnings = checkpoint.open_resume(
        run.run_dir, spec, run.recipe, run.total_steps, run.data.plan.steps_per_epoch
    )
    state, policy_state = checkpoint.load_checkpoint(path, run.model, run.optimizer)
    if state.data and state.data != run.data.identity():
        raise RecipeError(f"--resume: the training data changed since {path} ({state.data} vs {run.data.identity()}).")
    if run.policy is not None:
        run.policy.load_state_dict(policy_state)
    if run.reference is not None:
        run.reference.load_state_dict(policy_state)
    for w in warnings:
        run.console.print(f"[yellow]warning:[/yellow] {w}")
    run.guard.load_state_dict(state.guard)
    if run.scaler is not None and state.scaler:
        run.scaler.load_state_dict(state.scaler)
    run.dist.barrier()
    reported = 0
    if run.dist.is_main:
        reported = truncate_metrics(rundir.metrics_file(run.run_dir), state.step)
        atomic_write_text(rundir.recipe_file(run.run_dir), run.recipe.to_toml())  # the run directory's marker
    return state.step, reported


def adapter_meta(run: Run, step: int) -> dict[str, Any]:
    return {
        "base_model": run.recipe.model.model_dump(mode="json", exclude_none=True),
        "objective": run.recipe.objective.kind,
        "step": step,
        "dtype": str(run.dtype).removeprefix("torch."),
    }


def run(
    recipe: Recipe, console: Console | None = None, overwrite: bool = False, resume: str | None = None
) -> TrainResult:
    """Train as the recipe says (or continue from a checkpoint); returns what it did (paths, steps, time, outcome)."""
    console = console or Console(stderr=True)
    dist = distributed.init_from_env(recipe.train.strategy)
    try:
        return _run(recipe, console if dist.is_main else Console(quiet=True), overwrite, resume, dist)
    finally:
        distributed.shutdown(dist)


def describe(run: Run) -> list[str]:
    """The two lines that say what is about to be trained."""
    recipe = run.recipe
    n_train = sum(p.numel() for p in scoring.trainable_parameters(run.model))
    what = recipe.objective.kind + (f" ({run.policy.describe()})" if run.policy is not None else "")
    t = recipe.train
    return [
        f"model: {recipe.model.name} on {run.device.type}, {str(run.dtype).removeprefix('torch.')}"
        + (", 4-bit NF4 base" if recipe.model.load_in_4bit else "")
        + f"; LoRA r={recipe.lora.r}, {n_train:,} trainable parameters",
        f"objective: {what}; {run.total_steps} steps of {t.batch_size} sequences (micro-batch {t.micro_batch_size}), "
        f"lr {t.lr:g}" + _parallel(run.dist),
    ]


def _parallel(dist: Dist) -> str:
    if not dist.enabled:
        return ""
    return (
        f"; sharded (FSDP) over {dist.world} processes"
        if dist.sharded
        else f"; data-parallel over {dist.world} processes"
    )


def start_reporting(run: Run, start: int, reported: int) -> Reporter:
    """The trackers of `output.report_to` (rank 0 only), given the resolved recipe and the data statistics."""
    o = run.recipe.output
    reporter = open_reporter(
        o.report_to if run.dist.is_main else [],
        o.project,
        run.run_dir,
        start,
        reported,
        warn=lambda message: run.console.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False),
    )
    if reporter.backends:
        s = run.data_stats
        facts = {
            "data.examples": s.kept,
            "data.rows": s.rows,
            "data.trained_tokens": s.trained_tokens,
            "data.total_tokens": s.total_tokens,
            "data.longest": s.max_len,
            "data.dropped_too_long": s.dropped_too_long,
            "data.truncated": s.truncated,
            "run.total_steps": run.total_steps,
            "run.device": run.device.type,
            "run.dtype": str(run.dtype).removeprefix("torch."),
            "run.trainable_parameters": sum(p.numel() for p in scoring.trainable_parameters(run.model)),
            "run.psft_lite_version": __version__,
        }
        reporter.start(flat_config(run.recipe.model_dump(mode="json", exclude_none=True), facts))
    return reporter


def _run(recipe: Recipe, console: Console, overwrite: bool, resume: str | None, dist: Dist) -> TrainResult:
    t_start = time.perf_counter()
    run = build(recipe, console, overwrite=overwrite, resuming=resume is not None, dist=dist)
    for line in describe(run):
        console.print(line)
    start, reported = 0, 0
    if resume is not None:
        start, reported = resume_point(run, resume)
        console.print(f"resuming at step {start} of {run.total_steps}")
    else:
        prepare_run_dir(run)
    reporter = start_reporting(run, start, reported)
    status, result = "failed", None
    try:
        result = _train_and_save(run, start, t_start, reporter)
        status = "finished"
        return result
    except Interrupted:
        status = "interrupted"
        raise
    finally:
        reporter.finish(result.scalars() if result is not None else {}, status)


def _train_and_save(run: Run, start: int, t_start: float, reporter: Reporter) -> TrainResult:
    recipe, dist, console = run.recipe, run.dist, run.console
    t_loop = time.perf_counter()
    records = train_loop(run, start, report=reporter.record)
    loop_s = time.perf_counter() - t_loop
    adapter = rundir.adapter_dir(run.run_dir)
    weights = sharding.adapter_state(run.model) if dist.sharded else None  # every rank gathers; rank 0 writes
    if dist.is_main:
        try:
            checkpoint.save_adapter(
                run.model, run.tokenizer, adapter, adapter_meta(run, run.total_steps), state_dict=weights
            )
        except OSError as e:
            raise RunError(
                f"could not write the adapter into {run.run_dir} ({e.strerror}); the last checkpoint is intact."
            ) from None
    dist.barrier()
    result = TrainResult(
        run_dir=run.run_dir,
        adapter=adapter,
        metrics_file=rundir.metrics_file(run.run_dir),
        steps=run.total_steps - start,
        train_seconds=loop_s,
        seconds=0.0,
        peak_memory_mb=peak_memory_mb(run.device),
        first=records[0] if records else None,
        last=records[-1] if records else None,
        final_nll=records[-1]["nll"] if records and "nll" in records[-1] else None,
        trackers=where(recipe.output.report_to, recipe.output.project, run.run_dir, reporter.state),
        main=dist.is_main,
        **(run_outcome(rundir.metrics_file(run.run_dir)) if dist.is_main else {}),
    )
    if dist.evaluates and recipe.eval.final and (recipe.eval.sets or recipe.data.eval or recipe.eval.retention):
        result.final_eval, verdict = final_eval(run)
        folder = rundir.eval_dir(run.run_dir)
        if dist.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(folder / "final.json", json.dumps(result.final_eval, indent=2) + "\n")
            if verdict is not None:
                retention.write_verdict(folder, verdict)
                result.gate = retention.gate(verdict, recipe.eval.max_forgetting)
    if dist.is_main and outputs.needs_model_memory(recipe.output.save):
        del run.model, run.optimizer  # the merge and the export load a model of their own
        written = outputs.write(run.run_dir, recipe.output, console)
        result.merged = Path(written["merged"]) if "merged" in written else None
        result.gguf = [Path(p) for p in written.get("gguf", [])]
    result.seconds = time.perf_counter() - t_start
    return result


def end_lines(result: TrainResult) -> tuple[list[str], list[str]]:
    """What `psft-lite train` says when a run ends: (to stderr) time, entropy kept and drift; (to stdout) where the
    adapter, metrics and outputs are."""
    last = result.last or {}
    notes = [
        f"[green]done[/green] in {result.seconds:.0f} s ({result.steps} steps, "
        f"{result.steps / max(result.train_seconds, 1e-9):.2f} steps/s, peak memory {result.peak_memory_mb:.0f} "
        "MB)" + (f"; final nll {last['nll']:.3f}" if "nll" in last else "")
    ]
    if result.entropy_start is not None:
        kept = result.entropy_kept
        notes.append(
            f"entropy on trained tokens: {result.entropy_start:.3f} over the first steps → "
            f"{result.entropy_end:.3f} over the last" + (f" (kept {kept:.0%})" if kept is not None else "")
        )
    if result.drift is not None:
        d = result.drift
        notes.append(
            f"drift from the base: {d:+.2f} nats at step {result.drift_step} (the training tokens are "
            f"{math.exp(d):.1f}× as likely as under the base model)"
        )
    else:
        notes.append(
            "drift from the base: not measured (guard.drift_watch is off, or the run was shorter than "
            "guard.drift_every)"
        )
    notes += final_eval_lines(result.final_eval or {})
    where_ = [f"adapter: {result.adapter}", f"metrics: {result.metrics_file}"]
    if result.merged is not None:
        where_.append(f"merged: {result.merged}")
    where_ += [f"gguf: {path}" for path in result.gguf]
    return notes, where_ + list(result.trackers)


def final_eval_lines(final: dict[str, Any]) -> list[str]:
    """`eval.final`, one line per set: accuracy before → after (for a set of the base's own answers, the KL to them);
    then the general-ability verdict and its KL."""
    lines = []
    for name, r in final.items():
        if name in ("seconds", "general_ability"):
            continue
        a = r["after"]
        if "kl_rows" in a:
            lines.append(
                f"{name}: KL to the base {a['kl_to_base']:.3f} nats/token on its own answers to {a['rows']} prompts"
            )
        else:
            b = r["before"]
            lines.append(f"{name} accuracy: {b['accuracy']:.1%} → {a['accuracy']:.1%} ({a['n']} held-out problems)")
    lines += final.get("general_ability", {}).get("lines", [])
    if lines:
        lines[-1] += f" (final evaluation: {final['seconds']:.0f} s)"
    return lines
