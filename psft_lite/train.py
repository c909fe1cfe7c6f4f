"""`psft-lite train`: build everything (`build`), then loop (`train_loop`). Building and looping never interleave.

One optimizer step (METHODS.md §2, §6):
    old-policy log-probs for the step's micro-batches (psft) → for each micro-batch: forward, loss weighted by the
    step's trained-token count, backward → clip → optimizer step (skipped on NaN/inf) → one metrics record.

The run directory's files (creating it, checkpoints, resume checks) belong to checkpoint.py, the metrics file to
metrics.py, the objectives to the table in objectives.py; this module calls them in order.
"""

from __future__ import annotations

import math
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from psft_lite import __version__, checkpoint, distributed, modeling
from psft_lite.checkpoint import RUN_MARKER, TrainState
from psft_lite.data import EncodeStats, Example, load_examples
from psft_lite.data.batching import Batch, DataPlan, StepData, pack_examples
from psft_lite.data.tokenize import pad_eos_note
from psft_lite.distributed import Dist
from psft_lite.errors import Interrupted, RecipeError, RunError
from psft_lite.guard import Guard
from psft_lite.metrics import MetricsWriter, ProgressDisplay, StepStats, peak_memory_mb, run_outcome, truncate_metrics
from psft_lite.objectives import OBJECTIVES, Objective, method_name, token_weights
from psft_lite.policy import OldPolicy, build_policy
from psft_lite.recipe import ObjectiveSection, Recipe, TrainSection
from psft_lite.trackers import Reporter, flat_config, open_reporter, require, where

# ---------------------------------------------------------------------------------------------------------------------
# Schedules: pure functions of the step, so a resumed run needs no scheduler state


def lr_at(step: int, total: int, t: TrainSection) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then constant / linear / cosine decay."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    progress = (step - t.warmup_steps) / max(1, total - t.warmup_steps)
    decay = 1 - progress if t.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * decay)


def idft_lambda(step: int, total: int, o: ObjectiveSection) -> float:
    """IDFT's λ: 0 during the warm-up fraction, then linear to 1 over the transition fraction (METHODS.md §4)."""
    frac = step / max(1, total)
    if frac < o.lambda_warmup:
        return 0.0
    if o.lambda_transition <= 0:
        return 1.0
    return min(1.0, (frac - o.lambda_warmup) / o.lambda_transition)


# ---------------------------------------------------------------------------------------------------------------------
# Building a run


@dataclass(kw_only=True)
class Run:
    """Everything one training run holds; `build` makes it whole."""

    recipe: Recipe
    objective: Objective
    device: torch.device
    dtype: torch.dtype
    tokenizer: Any
    model: Any
    data: StepData
    data_stats: EncodeStats
    total_steps: int
    optimizer: torch.optim.Optimizer
    policy: OldPolicy | None
    guard: Guard
    console: Console
    dist: Dist = field(default_factory=Dist)
    scaler: Any = None  # torch.amp.GradScaler for fp16 (dynamic loss scaling); None for bf16/fp32
    eval_examples: list[Example] = field(default_factory=list)  # data.eval, tokenized (reference NLL)
    eval_items: list[Any] = field(default_factory=list)  # the first eval.samples problems (generation accuracy)

    @property
    def run_dir(self) -> Path:
        return self.recipe.run_dir

    @property
    def examples(self) -> list[Example]:
        return self.data.examples

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def step_batches(self, step: int) -> list[Batch]:
        return self.data.batches(step)

    def amp(self) -> Any:
        return modeling.autocast(self.device, self.dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def loss_scaler(device: torch.device, dtype: torch.dtype) -> Any:
    """fp16 gradients underflow without loss scaling (bf16 and fp32 have fp32's range): a GradScaler for fp16."""
    if dtype != torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


def build_optimizer(
    params: list[torch.nn.Parameter], t: TrainSection, device: torch.device, console: Console
) -> torch.optim.Optimizer:
    if t.optimizer != "adamw" and device.type == "cuda":
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if t.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        return cls(params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)
    if t.optimizer != "adamw":
        console.print(
            f"[yellow]note:[/yellow] train.optimizer = {t.optimizer!r} needs CUDA; using AdamW on {device.type}."
        )
    fused = device.type == "cuda"
    return torch.optim.AdamW(params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay, fused=fused)


def load_data(recipe: Recipe, tokenizer: Any, console: Console) -> tuple[list[Example], EncodeStats, list, list]:
    """Training examples (packed if asked), their statistics, and the eval examples and problems; reported."""
    d, base_dir = recipe.data, recipe.path.parent if recipe.path else None
    examples, stats = load_examples(d.train, d, tokenizer, limit=d.limit, base_dir=base_dir)
    eval_examples, eval_items = [], []
    if d.eval is not None:  # fail now, not after training, if the eval data is unusable
        eval_examples, _ = load_examples(d.eval, d, tokenizer, base_dir=base_dir)
        if recipe.eval.every and recipe.eval.samples:
            from psft_lite.evaluate import eval_items as read_items

            eval_items = read_items(d.eval, d, limit=recipe.eval.samples, base_dir=base_dir)
    report_data(console, stats, tokenizer)
    if d.packing:
        n_before = len(examples)
        examples = pack_examples(examples, d.max_length)
        fill = sum(len(e) for e in examples) / (len(examples) * max(len(e) for e in examples))
        console.print(
            f"packing: {n_before} examples into {len(examples)} rows of up to {d.max_length} tokens ({fill:.0%} of "
            "the longest row's length filled on average)"
        )
    return examples, stats, eval_examples, eval_items


def report_data(console: Console, s: EncodeStats, tokenizer: Any) -> None:
    console.print(
        f"data: {s.kept} examples ({s.rows} rows), {s.trained_tokens:,} trained of {s.total_tokens:,} tokens, longest "
        f"{s.max_len}"
        + (f", {s.dropped_too_long} dropped as too long" if s.dropped_too_long else "")
        + (f", {s.truncated} truncated" if s.truncated else "")
    )
    if s.truncated:
        console.print(
            "[yellow]warning:[/yellow] truncated responses lose their end-of-turn token; raise data.max_length."
        )
    if s.eos_appended:
        console.print(
            f"note: the chat template ends assistant turns without a special token; appended eos to {s.eos_appended}."
        )
    note = pad_eos_note(tokenizer)
    if note:
        console.print(f"note: {note}")


def build(
    recipe: Recipe, console: Console, overwrite: bool = False, resuming: bool = False, dist: Dist | None = None
) -> Run:
    """Load and check everything a run needs; nothing is written to the run directory yet."""
    dist = dist or Dist()
    t, m = recipe.train, recipe.model
    require(recipe.output.report_to, f"{recipe.path}: output.report_to" if recipe.path else "output.report_to")
    if "gguf" in recipe.output.save:  # fail now, not after hours of training
        from psft_lite import gguf_check

        gguf_check.require(f"{recipe.path or 'the recipe'}: output.save = 'gguf' (the export's check in llama.cpp)")
    if t.batch_size % (t.micro_batch_size * dist.world):
        raise RecipeError(
            f"train.batch_size ({t.batch_size}) must be a multiple of train.micro_batch_size ({t.micro_batch_size}) × "
            f"the {dist.world} processes, so every process gets whole micro-batches of each global batch."
        )
    if not resuming:
        checkpoint.check_output_dir(recipe.run_dir, overwrite)
    elif not (recipe.run_dir / RUN_MARKER).is_file():
        raise RecipeError(f"--resume: {recipe.run_dir} is not a psft-lite run directory (output.dir of this recipe).")
    for w in recipe.warnings():
        console.print(f"[yellow]warning:[/yellow] {w}")
    seed_everything(t.seed)
    device = modeling.resolve_device(m.device)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
    if device.type == "cuda":  # peak_mem_mb is this run's, not the process's (a study trains many runs in one)
        torch.cuda.reset_peak_memory_stats(device)
    dtype = modeling.resolve_dtype(m.dtype, device)
    if m.name == modeling.EMBEDDED_MODEL and not (modeling.home() / "models" / m.name / "config.json").exists():
        console.print(f"converting the embedded model into {modeling.home() / 'models'} (once, ~20 s)")
    src = modeling.resolve_source(m)
    tokenizer = modeling.load_tokenizer(m, src)
    examples, stats, eval_examples, eval_items = load_data(recipe, tokenizer, console)

    model = modeling.attach_lora(modeling.load_base_model(m, device, dtype, src), recipe.lora, m.gradient_checkpointing)
    model.train()
    if dist.enabled:
        dist.broadcast_parameters(modeling.trainable_parameters(model))
        torch.manual_seed(t.seed + 1000 * dist.rank)  # own dropout masks per rank
    plan = DataPlan(len(examples), t.batch_size, t.micro_batch_size, t.seed, recipe.data.shuffle)
    data = StepData(examples, plan, tokenizer.pad_token_id, device, dist.rank, dist.world)
    total = plan.total_steps(t.epochs, t.max_steps)

    def amp() -> Any:
        return modeling.autocast(device, dtype)

    return Run(
        recipe=recipe,
        objective=OBJECTIVES[recipe.objective.kind],
        device=device,
        dtype=dtype,
        tokenizer=tokenizer,
        model=model,
        data=data,
        data_stats=stats,
        total_steps=total,
        optimizer=build_optimizer(modeling.trainable_parameters(model), t, device, console),
        policy=build_policy(recipe.objective, model, amp, data.batches, total),
        guard=Guard(recipe.guard, total, method_name(recipe.objective)),
        console=console,
        dist=dist,
        scaler=loss_scaler(device, dtype),
        eval_examples=eval_examples,
        eval_items=eval_items,
    )


# ---------------------------------------------------------------------------------------------------------------------
# One optimizer step


def train_step(run: Run, step: int) -> dict[str, Any]:
    """One optimizer step; returns its metrics record (without timing)."""
    o, t, spec = run.recipe.objective, run.recipe.train, run.objective
    lr = lr_at(step, run.total_steps, t)
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    batches = run.step_batches(step)
    n_tok, n_seq, n_all = run.data.totals(step)  # the whole step, over all ranks: normalisation is global
    if run.policy is not None and step >= o.sft_warmup_steps:
        olds = run.policy.old_logprobs(step, batches)
    else:
        olds = [None] * len(batches)
    lam = idft_lambda(step, run.total_steps, o)
    params = {k: getattr(o, k) for k in spec.params}
    base_lp = sample_base_logprobs(run, step, batches[0]) if batches else None
    stats = StepStats()
    drift = None
    for i, (b, old) in enumerate(zip(batches, olds)):
        with run.amp():
            logp, ent = modeling.response_logprobs(run.model, b)
        mask = b.target_mask
        weights = token_weights(mask, o.normalize, n_tok, n_seq, seq_ids=b.seq_ids)
        # old log-probs None: the old policy is the current one (ratio 1)
        inputs = {"entropy": ent, "old_logp": logp.detach() if old is None else old, "lam": lam}
        loss, s = spec.loss(logp, mask=mask, weights=weights, **{k: inputs[k] for k in spec.inputs}, **params)
        (loss if run.scaler is None else run.scaler.scale(loss)).backward()
        m = mask.float()
        s = {**s, "nll": -(logp.detach() * m).sum() / m.sum(), "entropy": (ent * m).sum() / m.sum()}
        stats.add(s, b.n_trained, float(loss.detach()))
        if i == 0 and base_lp is not None:
            drift = float(((logp.detach() - base_lp) * m).sum() / m.sum())
    trainable = modeling.trainable_parameters(run.model)
    run.dist.all_reduce_grads(trainable)
    stats.reduce(run.dist, ["nll", "entropy", *spec.stats], list(spec.max_stats))
    if run.dist.enabled and run.recipe.guard.drift_watch:
        d = run.dist.all_reduce(torch.tensor([drift or 0.0, float(drift is not None)], dtype=torch.float64))
        drift = float(d[0] / d[1]) if d[1] > 0 else None
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the scaled ones
    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, t.grad_clip if t.grad_clip > 0 else float("inf")))
    record = {
        "step": step + 1,
        "epoch": run.data.plan.epoch_of(step),
        **stats.result(),
        "grad_norm": grad_norm,
        "lr": lr,
        "tokens": n_all,
        "trained_tokens": n_tok,
    }
    if "lam" in spec.inputs:
        record["lambda"] = lam
    if run.policy is not None and run.policy.is_base and "approx_kl" in record:
        drift = -record["approx_kl"]  # free: the old policy is the base
    if drift is not None:
        record["drift"] = drift
    # under fp16 an overflowing gradient is routine: the scaler skips that update and lowers the scale by itself
    overflow = run.scaler is not None and not math.isfinite(grad_norm)
    skip = run.guard.check_step({**record, "grad_norm": 0.0} if overflow else record)
    if skip is not None:
        record["skipped"] = skip
    elif run.scaler is not None:
        run.scaler.step(run.optimizer)
    else:
        run.optimizer.step()
    if run.scaler is not None:
        run.scaler.update()
        record["loss_scale"] = float(run.scaler.get_scale())
        if overflow:
            record["overflow"] = 1.0
    run.optimizer.zero_grad(set_to_none=True)
    return record


def sample_base_logprobs(run: Run, step: int, b: Batch) -> torch.Tensor | None:
    """Base-model log-probs of one micro-batch every guard.drift_every steps, for the drift watch (an old policy that
    is the base needs none: its log-probs give the drift for free)."""
    g = run.recipe.guard
    free = run.policy is not None and run.policy.is_base
    if not g.drift_watch or not g.drift_every or free or (step + 1) % g.drift_every:
        return None
    with modeling.adapter_disabled(run.model), torch.no_grad(), run.amp():
        logp, _ = modeling.response_logprobs(run.model, b)
    return logp


def quick_eval(run: Run, step: int) -> dict[str, Any]:
    """In-training eval: reference NLL on data.eval and greedy accuracy on a few problems. Leaves the training state
    untouched (train mode restored, RNG forked; the 4-bit repack trap is disabled at load)."""
    from psft_lite.evaluate import evaluate_set, mean_nll
    from psft_lite.generate import Loaded

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
                summary, _ = evaluate_set(
                    loaded, run.eval_items, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, nll=False
                )
                rec.update(eval_accuracy=summary["accuracy"], eval_entropy=summary["mean_entropy"], eval_n=summary["n"])
        finally:
            run.model.train()
    rec["eval_s"] = time.perf_counter() - t0
    return rec


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
    path = run.run_dir / checkpoint.CHECKPOINTS / f"step-{step}"
    if run.dist.is_main:
        state = TrainState(
            step=step,
            epoch=run.data.plan.epoch_of(step - 1),
            data=run.data.identity(),
            guard=run.guard.state_dict(),
            scaler=run.scaler.state_dict() if run.scaler is not None else {},
        )
        policy_state = run.policy.state_dict() if run.policy is not None else {}
        t = run.recipe.train
        path = checkpoint.save_checkpoint(
            run.run_dir, run.model, run.optimizer, policy_state, state, run.recipe.to_toml(), t.keep_last
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
            f"psft-lite train {run.run_dir / RUN_MARKER} --resume --set guard.action=warn (or change the setting the "
            "message names and start a new run)."
        )


def maybe_eval(run: Run, done: int, writer: MetricsWriter, display: ProgressDisplay) -> None:
    """The in-training eval every `eval.every` steps and at the end (rank 0; the others wait)."""
    every = run.recipe.eval.every
    if not every or (done % every and done != run.total_steps):
        return
    if run.dist.is_main:
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
    """Optimizer steps start..total-1. Checkpoints every `train.save_every` steps and at the end; on SIGINT/SIGTERM
    (or when `should_stop(step)` says so) finishes the step, saves a checkpoint and raises `Interrupted`; a guard
    event asking to stop saves a checkpoint and raises `RunError`. Every metrics record also goes to `report` (the
    trackers)."""
    t, d = run.recipe.train, run.dist
    records: list[dict[str, Any]] = []
    with (
        MetricsWriter(run.run_dir / "metrics.jsonl" if d.is_main else None, forward=report) as writer,
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
            if stopping or done == run.total_steps or (t.save_every and done % t.save_every == 0):
                path = save_state(run, done)
            if stopping:
                raise Interrupted(
                    f"stopped after step {done} of {run.total_steps}; checkpoint saved to {path}. Resume with:\n  "
                    f"psft-lite train {run.run_dir / RUN_MARKER} --resume",
                    exit_code=143 if stop.signum == signal.SIGTERM else 130,
                )
    return records


# ---------------------------------------------------------------------------------------------------------------------
# Starting and resuming (rank-aware: rank 0 touches the files, every rank waits for it)


def prepare_run_dir(run: Run) -> None:
    """Create (or, with --overwrite, replace) the run directory and write the resolved recipe into it (rank 0)."""
    run.dist.barrier()  # every rank has checked output.dir before rank 0 changes it
    if run.dist.is_main:
        n = sum(p.numel() for p in modeling.trainable_parameters(run.model))
        checkpoint.create_run_dir(
            run.run_dir, run.recipe.to_toml(), checkpoint.checkpoint_size(n), run.recipe.train.keep_last
        )
    run.dist.barrier()


def resume_point(run: Run, spec: str) -> tuple[int, int]:
    """Load the checkpoint `spec` names into the run; returns the number of steps it had completed and the last step
    the interrupted run had reported (its metrics.jsonl went further than the checkpoint if it was killed)."""
    path, warnings = checkpoint.open_resume(run.run_dir, spec, run.recipe, run.total_steps)
    state, policy_state = checkpoint.load_checkpoint(path, run.model, run.optimizer)
    if state.data and state.data != run.data.identity():
        raise RecipeError(f"--resume: the training data changed since {path} ({state.data} vs {run.data.identity()}).")
    if run.policy is not None:
        run.policy.load_state_dict(policy_state)
    for w in warnings:
        run.console.print(f"[yellow]warning:[/yellow] {w}")
    run.guard.load_state_dict(state.guard)
    if run.scaler is not None and state.scaler:
        run.scaler.load_state_dict(state.scaler)
    run.dist.barrier()
    reported = 0
    if run.dist.is_main:
        reported = truncate_metrics(run.run_dir / "metrics.jsonl", state.step)
        (run.run_dir / RUN_MARKER).write_text(run.recipe.to_toml(), encoding="utf-8")
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
) -> dict[str, Any]:
    """Train as the recipe says (or continue from a checkpoint); returns a summary (paths, steps, time)."""
    console = console or Console(stderr=True)
    dist = distributed.init_from_env()
    try:
        return _run(recipe, console if dist.is_main else Console(quiet=True), overwrite, resume, dist)
    finally:
        distributed.shutdown(dist)


def describe(run: Run) -> list[str]:
    """The two lines that say what is about to be trained."""
    recipe = run.recipe
    n_train = sum(p.numel() for p in modeling.trainable_parameters(run.model))
    what = recipe.objective.kind + (f" ({run.policy.describe()})" if run.policy is not None else "")
    t = recipe.train
    return [
        f"model: {recipe.model.name} on {run.device.type}, {str(run.dtype).removeprefix('torch.')}"
        + (", 4-bit NF4 base" if recipe.model.load_in_4bit else "")
        + f"; LoRA r={recipe.lora.r}, {n_train:,} trainable parameters",
        f"objective: {what}; {run.total_steps} steps of {t.batch_size} sequences (micro-batch {t.micro_batch_size}), "
        f"lr {t.lr:g}" + (f"; data-parallel over {run.dist.world} processes" if run.dist.enabled else ""),
    ]


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
            "run.trainable_parameters": sum(p.numel() for p in modeling.trainable_parameters(run.model)),
            "run.psft_lite_version": __version__,
        }
        reporter.start(flat_config(run.recipe.model_dump(mode="json", exclude_none=True), facts))
    return reporter


def _run(recipe: Recipe, console: Console, overwrite: bool, resume: str | None, dist: Dist) -> dict[str, Any]:
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
    status, summary = "failed", {}
    try:
        summary = _train_and_save(run, start, t_start, reporter)
        status = "finished"
        return summary
    except Interrupted:
        status = "interrupted"
        raise
    finally:
        reporter.finish({k: v for k, v in summary.items() if k not in ("first", "last", "main", "trackers")}, status)


def _train_and_save(run: Run, start: int, t_start: float, reporter: Reporter) -> dict[str, Any]:
    recipe, dist, console = run.recipe, run.dist, run.console
    t_loop = time.perf_counter()
    records = train_loop(run, start, report=reporter.record)
    loop_s = time.perf_counter() - t_loop
    adapter = run.run_dir / "adapter"
    if dist.is_main:
        try:
            checkpoint.save_adapter(run.model, run.tokenizer, adapter, adapter_meta(run, run.total_steps))
        except OSError as e:
            raise RunError(
                f"could not write the adapter into {run.run_dir} ({e.strerror}); the last checkpoint is intact."
            ) from None
    dist.barrier()
    summary = {
        "run_dir": str(run.run_dir),
        "adapter": str(adapter),
        "metrics": str(run.run_dir / "metrics.jsonl"),
        "steps": run.total_steps - start,
        "train_s": loop_s,
        "total_s": time.perf_counter() - t_start,
        "peak_mem_mb": peak_memory_mb(run.device),
        "first": records[0] if records else None,
        "last": records[-1] if records else None,
        "main": dist.is_main,
        **(run_outcome(run.run_dir / "metrics.jsonl") if dist.is_main else {}),
        "trackers": where(recipe.output.report_to, recipe.output.project, run.run_dir, reporter.state),
    }
    if records and "nll" in records[-1]:
        summary["final_nll"] = records[-1]["nll"]
    if dist.is_main and ("merged" in recipe.output.save or "gguf" in recipe.output.save):
        del run.model, run.optimizer
    if "merged" in recipe.output.save and dist.is_main:
        from psft_lite.merge import merge

        report = merge(adapter, out=run.run_dir / "merged", console=console)
        summary["merged"] = str(report["out"])
    if "gguf" in recipe.output.save and dist.is_main:
        from psft_lite.export import export

        report = export(run.run_dir, quant=recipe.output.gguf_quant, overwrite=True, console=console)
        summary["gguf"] = [f["path"] for f in report["files"]]
    return summary
