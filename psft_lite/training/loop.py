"""The training loop: optimizer steps with timing, metrics, guard rails, in-training eval, checkpoints, and a clean
stop on Ctrl-C/SIGTERM (finish the step, save, say how to resume)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from psft_lite.core import rundir
from psft_lite.core.errors import Interrupted, RunError
from psft_lite.model import scoring
from psft_lite.tracking.metrics import MetricsWriter, ProgressDisplay, peak_memory_mb
from psft_lite.training import checkpoint, sharding
from psft_lite.training.build import Run
from psft_lite.training.checkpoint import TrainState
from psft_lite.training.step import train_step


def quick_eval(run: Run, step: int) -> dict[str, Any]:
    """In-training eval: reference NLL on data.eval and greedy accuracy on a few problems. Leaves the training state
    untouched (train mode restored, RNG forked; the 4-bit repack trap is disabled at load)."""
    from psft_lite.inference.evaluate import evaluate_sets, mean_nll
    from psft_lite.inference.generate import Loaded

    e = run.recipe.eval
    loaded = Loaded(run.model, run.tokenizer, "run", run.device, run.dtype)
    rec: dict[str, Any] = {"event": "eval", "step": step}
    devices = [run.device] if run.device.type == "cuda" else []
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=devices):
        run.model.eval()
        try:
            rec["eval_loss"] = mean_nll(loaded, run.eval_examples)
            if run.eval_items:
                summaries, _ = evaluate_sets(
                    loaded,
                    {"eval": run.eval_items},
                    max_new_tokens=e.max_new_tokens,
                    batch_size=e.batch_size,
                    nll=False,
                )
                summary = summaries["eval"]
                rec.update(eval_accuracy=summary["accuracy"], eval_entropy=summary["mean_entropy"], eval_n=summary["n"])
        finally:
            run.model.train()
    rec["eval_s"] = time.perf_counter() - t0
    return rec


def final_eval(run: Run) -> tuple[dict[str, Any], Any]:
    """`eval.final`: each eval set scored greedy by the base (adapter disabled) and by the trained model on its first
    `final_limit` problems (a set of the base's own answers: only the KL and NLL of the model); with `eval.retention`,
    the general-ability verdict. Returns (JSON-able results, the verdict or None)."""
    t0 = time.perf_counter()
    from psft_lite.inference import retention
    from psft_lite.inference.evaluate import evaluate_sets, is_retention_set, taught_openings
    from psft_lite.inference.generate import Loaded

    e = run.recipe.eval
    sets = {name: items[: e.final_limit] for name, items in run.final_items.items()}
    base_spec = run.recipe.model.model_dump(mode="json", exclude_none=True)
    loaded = Loaded(run.model, run.tokenizer, "run", run.device, run.dtype, adapter=run.run_dir, base_spec=base_spec)
    kw = dict(max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, nll=False)
    run.model.eval()
    after, _ = evaluate_sets(loaded, sets, **kw, console=run.console)
    with scoring.adapter_disabled(run.model):
        plain = {k: v for k, v in sets.items() if not is_retention_set(v)}
        before, _ = evaluate_sets(loaded, plain, **kw, console=run.console)
    out: dict[str, Any] = {
        name: {"after": after[name], **({"before": before[name]} if name in before else {})} for name in sets
    }
    taught = taught_openings(run.final_items)
    verdict = None
    if e.retention:
        items = retention.load_suite(kinds=e.retention_kinds)
        verdict = retention.evaluate_retention(loaded, items, console=run.console, taught=taught)
    if verdict is not None:
        out["general_ability"] = {**verdict.as_dict(), "lines": retention.report_lines(verdict)}
    return {**out, "seconds": time.perf_counter() - t0}, verdict


# ---------------------------------------------------------------------------------------------------------------------
# The loop


class StopSignal:
    """Turns SIGINT/SIGTERM into a request to stop after the current optimizer step (a second Ctrl-C aborts)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def timed_step(run: Run, step: int) -> dict[str, Any]:
    """`train_step` plus its wall time, throughput and peak memory (the slowest rank's time, the largest memory)."""
    t0 = time.perf_counter()
    rec = train_step(run, step)
    rec["step_s"] = time.perf_counter() - t0
    rec["tokens_per_s"] = rec["tokens"] / rec["step_s"]
    rec["peak_mem_mb"] = peak_memory_mb(run.device)
    if run.dist.enabled:  # tokens are already global
        agg = run.dist.all_reduce(torch.tensor([rec["step_s"], rec["peak_mem_mb"]], dtype=torch.float64), op="max")
        rec["step_s"], rec["peak_mem_mb"] = float(agg[0]), float(agg[1])
        rec["tokens_per_s"] = rec["tokens"] / rec["step_s"]
    return rec


def save_state(run: Run, step: int) -> Path:
    """Checkpoint after `step` steps (rank 0 writes; the others wait for it)."""
    path = rundir.checkpoint_dir(run.run_dir, step)
    gathered = {}
    if run.dist.sharded:  # every rank takes part in gathering the shards; rank 0 writes them
        gathered = {
            "adapter_state": sharding.adapter_state(run.model),
            "optimizer_state": sharding.optimizer_state(run.model, run.optimizer),
        }
    if run.dist.is_main:
        state = TrainState(
            step=step,
            epoch=run.data.plan.epoch_of(step - 1),
            data=run.data.identity(),
            guard=run.guard.state_dict(),
            scaler=run.scaler.state_dict() if run.scaler is not None else {},
        )
        policy_state = run.policy.state_dict() if run.policy is not None else {}
        if run.reference is not None:  # the base's cached hidden states travel with the old-policy state
            policy_state = {**policy_state, **run.reference.state_dict()}
        t = run.recipe.train
        path = checkpoint.save_checkpoint(
            run.run_dir, run.model, run.optimizer, policy_state, state, run.recipe.to_toml(), t.keep_last, **gathered
        )
    run.dist.barrier()
    return path


def watch(run: Run, rec: dict[str, Any], writer: MetricsWriter, display: ProgressDisplay) -> None:
    """Guard rails on the step's record: events to the metrics file and the screen; a stopping event saves a
    checkpoint and raises `RunError`."""
    events = run.guard.observe(rec, rec.get("skipped"))
    for ev in events:
        writer.write(ev)
        display.warn(ev["message"])
    if any(ev["stop"] for ev in events):
        path = save_state(run, rec["step"])
        raise RunError(
            f"{events[-1]['message']} The run was stopped (guard); checkpoint saved to {path}. To continue anyway: "
            f"psft-lite train {rundir.recipe_file(run.run_dir)} --resume --set guard.action=warn (or change the "
            "setting the message names and start a new run)."
        )


def maybe_eval(run: Run, done: int, writer: MetricsWriter, display: ProgressDisplay) -> None:
    """The in-training eval every `eval.every` steps and at the end (rank 0, the others wait; sharded, every rank
    runs the same forwards and rank 0 reports)."""
    every = run.recipe.eval.every
    if not every or (done % every and done != run.total_steps):
        return
    if run.dist.evaluates:
        ev = quick_eval(run, done)
        writer.write(ev)
        display.note(ev)
    run.dist.barrier()


def train_loop(
    run: Run,
    start: int = 0,
    should_stop: Callable[[int], bool] | None = None,
    report: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Optimizer steps start..total-1. Checkpoints every `train.save_every` steps, at `train.save_at` and at the end;
    on SIGINT/SIGTERM (or when `should_stop(step)` says so) finishes the step, saves a checkpoint and raises
    `Interrupted`; a guard event asking to stop saves a checkpoint and raises `RunError`. Every metrics record also
    goes to `report` (the trackers)."""
    t, d = run.recipe.train, run.dist
    records: list[dict[str, Any]] = []
    with (
        MetricsWriter(rundir.metrics_file(run.run_dir) if d.is_main else None, forward=report) as writer,
        ProgressDisplay(run.console, run.total_steps, start, every=t.log_every) as display,
        StopSignal() as stop,
    ):
        for step in range(start, run.total_steps):
            rec = timed_step(run, step)
            writer.write(rec)
            records.append(rec)
            display.update(rec)
            watch(run, rec, writer, display)
            done = step + 1
            maybe_eval(run, done, writer, display)
            stopping = stop.signum is not None or (should_stop is not None and should_stop(done))
            if d.enabled:  # a signal may reach one rank first: all stop after the same step
                stopping = bool(d.all_reduce(torch.tensor([float(stopping)]), op="max")[0])
            if stopping or done == run.total_steps or (t.save_every and done % t.save_every == 0) or done in t.save_at:
                path = save_state(run, done)
            if stopping:
                raise Interrupted(
                    f"stopped after step {done} of {run.total_steps}; checkpoint saved to {path}. Resume with:\n  "
                    f"psft-lite train {rundir.recipe_file(run.run_dir)} --resume",
                    exit_code=143 if stop.signum == signal.SIGTERM else 130,
                )
    return records
