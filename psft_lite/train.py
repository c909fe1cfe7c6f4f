"""`psft-lite train`: build everything (`run`), then loop (`train_loop`). Building and looping never interleave.

One optimizer step (METHODS.md §2, §6):
    old-policy log-probs for the step's micro-batches (psft) → for each micro-batch: forward, loss weighted by the
    step's trained-token count, backward → clip → optimizer step (skipped on NaN/inf) → one metrics record.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from rich.console import Console

from psft_lite import distributed, modeling
from psft_lite.checkpoint import (
    TrainState,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_adapter,
    save_checkpoint,
)
from psft_lite.data import EncodeStats, Example, load_examples
from psft_lite.data.batching import Batch, DataPlan, collate, pack_examples
from psft_lite.errors import Interrupted, RecipeError, RunError
from psft_lite.distributed import Dist
from psft_lite.guard import Guard
from psft_lite.metrics import MetricsWriter, ProgressDisplay, StepStats, peak_memory_mb
from psft_lite.objectives import dft_loss, idft_loss, psft_loss, sft_loss, token_weights
from psft_lite.policy import BasePolicy, OldPolicy, SnapshotPolicy, make_scorer
from psft_lite.recipe import ObjectiveSection, Recipe, TrainSection, load_recipe, math_differences

RUN_MARKER = "recipe.toml"  # a folder holding this file is a psft-lite run directory


# ---------------------------------------------------------------------------------------------------------------------
# Pure pieces: schedules and the objective dispatch


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


def objective_loss(
    o: ObjectiveSection,
    logp: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    old_logp: torch.Tensor | None,
    lam: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if o.kind == "sft":
        return sft_loss(logp, mask, weights)
    if o.kind == "dft":
        return dft_loss(logp, mask, weights)
    if o.kind == "idft":
        return idft_loss(logp, entropy, mask, weights, o.beta, o.gamma_min, o.gamma_max, lam)
    old = logp.detach() if old_logp is None else old_logp  # None: the old policy is the current one (ratio 1)
    return psft_loss(logp, old, mask, weights, o.clip_high, o.clip_low)


# ---------------------------------------------------------------------------------------------------------------------
# Building a run


@dataclass
class Run:
    recipe: Recipe
    device: torch.device
    dtype: torch.dtype
    tokenizer: Any
    model: Any
    examples: list[Example]
    data_stats: EncodeStats
    plan: DataPlan
    total_steps: int
    optimizer: torch.optim.Optimizer
    policy: OldPolicy | None
    run_dir: Path
    console: Console
    pad_id: int
    eval_examples: list[Example] = field(default_factory=list)  # data.eval, tokenized (reference NLL)
    eval_items: list[Any] = field(default_factory=list)  # the first eval.samples problems (generation accuracy)
    dist: Dist = field(default_factory=Dist)
    guard: Guard = field(init=False)
    lengths: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = np.array([len(e) for e in self.examples])
        self.guard = Guard(self.recipe.guard, self.total_steps)

    def amp(self) -> Any:
        return modeling.autocast(self.device, self.dtype)

    def data_identity(self) -> dict[str, Any]:
        """What fixes the order of examples: a resumed run must see the same."""
        return {"n_examples": len(self.examples), "tokens": int(self.lengths.sum()), "batch_size": self.plan.batch_size,
                "seed": self.plan.seed, "shuffle": self.plan.shuffle}  # fmt: skip

    def step_batches(self, step: int) -> list[Batch]:
        """This rank's micro-batches of optimizer step `step` (all of them in a single process)."""
        d = self.dist
        return [
            collate([self.examples[i] for i in mb], mb, self.pad_id).to(self.device)
            for mb in self.plan.micro_batches(step, self.lengths)[d.rank :: d.world]
        ]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse to mix a new run into a non-empty folder, and never delete a folder that is not a psft-lite run."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        raise RecipeError(f"output.dir {path}: {existing} is not writable; choose another output.dir.")
    if not path.exists():
        return
    if not path.is_dir():
        raise RecipeError(f"output.dir {path} exists and is a file; choose another output.dir.")
    if not any(path.iterdir()):
        return
    if not overwrite:
        resume = " Pass --resume to continue it from its last checkpoint," if list_checkpoints(path) else ""
        raise RecipeError(
            f"output.dir {path} already holds a run.{resume} Pass --overwrite to replace it, or choose another "
            "output.dir (e.g. --set output.dir=runs/new-name)."
        )
    if not (path / RUN_MARKER).exists():
        raise RecipeError(
            f"output.dir {path} is not empty and is not a psft-lite run directory; refusing to overwrite it. "
            "Choose another output.dir."
        )


def build_optimizer(params: list[torch.nn.Parameter], t: TrainSection, device: torch.device, console: Console) -> torch.optim.Optimizer:
    if t.optimizer != "adamw" and device.type == "cuda":
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if t.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        return cls(params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)
    if t.optimizer != "adamw":
        console.print(f"[yellow]note:[/yellow] train.optimizer = {t.optimizer!r} needs CUDA; using AdamW on {device.type}.")
    return torch.optim.AdamW(params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay, fused=device.type == "cuda")


def build_policy(r: Run) -> OldPolicy | None:
    o = r.recipe.objective
    if o.kind != "psft":
        return None
    score = make_scorer(r.model, r.amp)
    if o.old_policy == "base":
        return BasePolicy(score, r.model)
    return SnapshotPolicy(score, o.refresh_every, r.step_batches, r.total_steps)


def build(recipe: Recipe, console: Console, overwrite: bool = False, resuming: bool = False, dist: Dist | None = None) -> Run:
    """Load and check everything a run needs; nothing is written to the run directory yet."""
    dist = dist or Dist()
    run_dir = recipe.run_dir
    t = recipe.train
    if t.batch_size % (t.micro_batch_size * dist.world):
        raise RecipeError(
            f"train.batch_size ({t.batch_size}) must be a multiple of train.micro_batch_size ({t.micro_batch_size}) × "
            f"the {dist.world} processes, so every process gets whole micro-batches of each global batch."
        )
    if resuming:
        if not (run_dir / RUN_MARKER).is_file():
            raise RecipeError(f"--resume: {run_dir} is not a psft-lite run directory (output.dir of this recipe).")
    else:
        check_output_dir(run_dir, overwrite)
    for w in recipe.warnings():
        console.print(f"[yellow]warning:[/yellow] {w}")
    seed_everything(recipe.train.seed)
    m = recipe.model
    device = modeling.resolve_device(m.device)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
    dtype = modeling.resolve_dtype(m.dtype, device)
    if m.name == modeling.EMBEDDED_MODEL and not (modeling.home() / "models" / m.name / "config.json").exists():
        console.print(f"converting the embedded model into {modeling.home() / 'models'} (once, ~20 s)")
    src = modeling.resolve_source(m)
    tokenizer = modeling.load_tokenizer(m, src)
    base_dir = recipe.path.parent if recipe.path else None
    examples, stats = load_examples(recipe.data.train, recipe.data, tokenizer, limit=recipe.data.limit, base_dir=base_dir)
    eval_examples, eval_items = [], []
    if recipe.data.eval is not None:  # fail now, not after training, if the eval data is unusable
        eval_examples, _ = load_examples(recipe.data.eval, recipe.data, tokenizer, base_dir=base_dir)
        if recipe.eval.every and recipe.eval.samples:
            from psft_lite.evaluate import eval_items as read_items

            eval_items = read_items(recipe.data.eval, recipe.data, limit=recipe.eval.samples, base_dir=base_dir)
    report_data(console, stats, tokenizer)
    if recipe.data.packing:
        n_before = len(examples)
        examples = pack_examples(examples, recipe.data.max_length)
        fill = sum(len(e) for e in examples) / (len(examples) * max(len(e) for e in examples))
        console.print(f"packing: {n_before} examples into {len(examples)} rows of up to {recipe.data.max_length} "
                      f"tokens ({fill:.0%} of the longest row's length filled on average)")  # fmt: skip

    base = modeling.load_base_model(m, device, dtype, src)
    model = modeling.attach_lora(base, recipe.lora, m.gradient_checkpointing)
    model.train()
    if dist.enabled:
        dist.broadcast_parameters(modeling.trainable_parameters(model))
        torch.manual_seed(recipe.train.seed + 1000 * dist.rank)  # own dropout masks per rank
    plan = DataPlan(len(examples), t.batch_size, t.micro_batch_size, t.seed, recipe.data.shuffle)
    total = plan.total_steps(t.epochs, t.max_steps)
    optimizer = build_optimizer(modeling.trainable_parameters(model), t, device, console)
    run = Run(recipe, device, dtype, tokenizer, model, examples, stats, plan, total, optimizer, None, run_dir, console,
              tokenizer.pad_token_id, eval_examples, eval_items, dist)  # fmt: skip
    run.policy = build_policy(run)
    return run


def report_data(console: Console, s: EncodeStats, tokenizer: Any) -> None:
    console.print(
        f"data: {s.kept} examples ({s.rows} rows), {s.trained_tokens:,} trained of {s.total_tokens:,} tokens, "
        f"longest {s.max_len}" + (f", {s.dropped_too_long} dropped as too long" if s.dropped_too_long else "")
        + (f", {s.truncated} truncated" if s.truncated else "")
    )
    if s.truncated:
        console.print("[yellow]warning:[/yellow] truncated responses lose their end-of-turn token; raise data.max_length.")
    if s.eos_appended:
        console.print(f"note: the chat template ends assistant turns without a special token; appended eos to {s.eos_appended}.")
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        console.print(
            f"note: pad token = eos token ({tokenizer.eos_token}); masks are built from positions, so the "
            "end-of-turn token is still trained."
        )


# ---------------------------------------------------------------------------------------------------------------------
# The loop


def train_step(r: Run, step: int) -> dict[str, Any]:
    """One optimizer step; returns its metrics record (without timing)."""
    o, t = r.recipe.objective, r.recipe.train
    lr = lr_at(step, r.total_steps, t)
    for g in r.optimizer.param_groups:
        g["lr"] = lr
    batches = r.step_batches(step)
    everyone = r.plan.step_indices(step)  # the whole step, over all ranks: normalisation is global
    n_tok = sum(r.examples[i].n_trained for i in everyone)
    n_seq = sum(r.examples[i].n_sequences for i in everyone)
    if r.policy is not None and step >= o.sft_warmup_steps:
        olds = r.policy.old_logprobs(step, batches)
    else:
        olds = [None] * len(batches)
    lam = idft_lambda(step, r.total_steps, o)
    base_lp = sample_base_logprobs(r, step, batches[0]) if batches else None
    stats = StepStats()
    drift = None
    for i, (b, old) in enumerate(zip(batches, olds)):
        with r.amp():
            logp, ent = modeling.response_logprobs(r.model, b)
        mask = b.target_mask
        weights = token_weights(mask, o.normalize, n_tok, n_seq, seq_ids=b.seq_ids)
        loss, s = objective_loss(o, logp, ent, mask, weights, old, lam)
        loss.backward()
        m = mask.float()
        s = {**s, "nll": -(logp.detach() * m).sum() / m.sum(), "entropy": (ent * m).sum() / m.sum()}
        stats.add(s, b.n_trained, float(loss.detach()))
        if i == 0 and base_lp is not None:
            drift = float(((logp.detach() - base_lp) * m).sum() / m.sum())
    params = modeling.trainable_parameters(r.model)
    r.dist.all_reduce_grads(params)
    stats.reduce(r.dist, ["nll", "entropy", *STAT_KEYS[o.kind]], MAX_KEYS.get(o.kind, []))
    if r.dist.enabled and r.recipe.guard.drift_watch:
        d = r.dist.all_reduce(torch.tensor([drift or 0.0, float(drift is not None)], dtype=torch.float64))
        drift = float(d[0] / d[1]) if d[1] > 0 else None
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else float("inf")))
    record = {"step": step + 1, "epoch": r.plan.epoch_of(step), **stats.result(), "grad_norm": grad_norm, "lr": lr,
              "tokens": sum(len(r.examples[i]) for i in everyone), "trained_tokens": n_tok}  # fmt: skip
    if o.kind == "idft":
        record["lambda"] = lam
    if o.kind == "psft" and o.old_policy == "base" and "approx_kl" in record:
        drift = -record["approx_kl"]  # free: the old policy is the base
    if drift is not None:
        record["drift"] = drift
    skip = r.guard.check_step(record)
    if skip is None:
        r.optimizer.step()
    else:
        record["skipped"] = skip
    r.optimizer.zero_grad(set_to_none=True)
    return record


#: Per-objective statistics (token-weighted means, and maxima) combined across ranks; fixed so every rank agrees.
STAT_KEYS = {"sft": [], "dft": [], "psft": ["clip_frac", "ratio_mean", "approx_kl"],
             "idft": ["phi_mean", "phi_std", "gamma_mean", "weight_mean"]}  # fmt: skip
MAX_KEYS = {"psft": ["ratio_max"]}


def sample_base_logprobs(r: Run, step: int, b: Batch) -> torch.Tensor | None:
    """Base-model log-probs of one micro-batch every guard.drift_every steps, for the drift watch (psft base mode
    needs none: its old log-probs are the base's)."""
    g, o = r.recipe.guard, r.recipe.objective
    if not g.drift_watch or not g.drift_every or (o.kind == "psft" and o.old_policy == "base") or (step + 1) % g.drift_every:
        return None
    with modeling.adapter_disabled(r.model), torch.no_grad(), r.amp():
        logp, _ = modeling.response_logprobs(r.model, b)
    return logp


def quick_eval(r: Run, step: int) -> dict[str, Any]:
    """In-training eval: reference NLL on data.eval and greedy accuracy on a few problems. Leaves the training state
    untouched (train mode restored, RNG forked; the 4-bit repack trap is disabled at load)."""
    from psft_lite.evaluate import evaluate_set, mean_nll
    from psft_lite.generate import Loaded

    e = r.recipe.eval
    loaded = Loaded(r.model, r.tokenizer, "run", r.device, r.dtype)
    rec: dict[str, Any] = {"event": "eval", "step": step}
    devices = [r.device] if r.device.type == "cuda" else []
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=devices):
        r.model.eval()
        try:
            rec["eval_loss"] = mean_nll(loaded, r.eval_examples)
            if r.eval_items:
                summary, _ = evaluate_set(loaded, r.eval_items, max_new_tokens=e.max_new_tokens,
                                          batch_size=e.batch_size, nll=False)  # fmt: skip
                rec.update(eval_accuracy=summary["accuracy"], eval_entropy=summary["mean_entropy"], eval_n=summary["n"])
        finally:
            r.model.train()
    rec["eval_s"] = time.perf_counter() - t0
    return rec


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


def save_state(r: Run, step: int) -> Path:
    """Checkpoint after `step` steps (rank 0 writes; the others wait for it)."""
    state = TrainState(step=step, epoch=r.plan.epoch_of(step - 1), data=r.data_identity(), guard=r.guard.state_dict())
    path = r.run_dir / "checkpoints" / f"step-{step}"
    if r.dist.is_main:
        policy_state = r.policy.state_dict() if r.policy is not None else {}
        try:
            path = save_checkpoint(r.run_dir, r.model, r.optimizer, policy_state, state, r.recipe.to_toml())
        except OSError as e:  # disk full, quota, a vanished mount: the half-written folder is already gone
            kept = list_checkpoints(r.run_dir)
            last = f"the last good checkpoint, {kept[-1][1]}, is intact: free space and continue with --resume" if kept \
                else "no earlier checkpoint exists"  # fmt: skip
            raise RunError(f"could not write checkpoint step-{step} into {r.run_dir / 'checkpoints'} "
                           f"({e.strerror or e}); {last}.") from None  # fmt: skip
        prune_checkpoints(r.run_dir, r.recipe.train.keep_last)
    r.dist.barrier()
    return path


def train_loop(r: Run, start: int = 0, should_stop: Callable[[int], bool] | None = None) -> list[dict[str, Any]]:
    """Optimizer steps start..total-1. Checkpoints every `train.save_every` steps and at the end; on SIGINT/SIGTERM
    (or when `should_stop(step)` says so) finishes the step, saves a checkpoint and raises `Interrupted`; a guard
    event asking to stop saves a checkpoint and raises `RunError`."""
    t, t_eval, d = r.recipe.train, r.recipe.eval, r.dist
    writer = MetricsWriter(r.run_dir / "metrics.jsonl") if d.is_main else MetricsWriter(None)
    display = ProgressDisplay(r.console, r.total_steps, start, every=t.log_every)
    records: list[dict[str, Any]] = []
    try:
        with StopSignal() as stop:
            for step in range(start, r.total_steps):
                t0 = time.perf_counter()
                rec = train_step(r, step)
                rec["step_s"] = time.perf_counter() - t0
                rec["tokens_per_s"] = rec["tokens"] / rec["step_s"]
                rec["peak_mem_mb"] = peak_memory_mb(r.device)
                if d.enabled:  # the slowest rank's time, the largest rank's memory; tokens are already global
                    agg = d.all_reduce(torch.tensor([rec["step_s"], rec["peak_mem_mb"]], dtype=torch.float64), op="max")
                    rec["step_s"], rec["peak_mem_mb"] = float(agg[0]), float(agg[1])
                    rec["tokens_per_s"] = rec["tokens"] / rec["step_s"]
                writer.write(rec)
                records.append(rec)
                display.update(rec)
                events = r.guard.observe(rec, rec.get("skipped"))
                for ev in events:
                    writer.write(ev)
                    display.warn(ev["message"])
                done = step + 1
                if any(ev["stop"] for ev in events):
                    path = save_state(r, done)
                    raise RunError(
                        f"{events[-1]['message']} The run was stopped (guard); checkpoint saved to {path}. To continue "
                        f"anyway: psft-lite train {r.run_dir / RUN_MARKER} --resume --set guard.action=warn "
                        "(or change the setting the message names and start a new run)."
                    )
                if t_eval.every and (done % t_eval.every == 0 or done == r.total_steps):
                    if d.is_main:
                        ev = quick_eval(r, done)
                        writer.write(ev)
                        display.note(ev)
                    d.barrier()
                stopping = stop.signum is not None or (should_stop is not None and should_stop(done))
                if d.enabled:  # a signal may reach one rank first: all stop after the same step
                    stopping = bool(d.all_reduce(torch.tensor([float(stopping)]), op="max")[0])
                if stopping or done == r.total_steps or (t.save_every and done % t.save_every == 0):
                    path = save_state(r, done)
                if stopping:
                    display.close()
                    code = 143 if stop.signum == signal.SIGTERM else 130
                    raise Interrupted(
                        f"stopped after step {done} of {r.total_steps}; checkpoint saved to {path}. Resume with:\n"
                        f"  psft-lite train {r.run_dir / RUN_MARKER} --resume",
                        exit_code=code,
                    )
    finally:
        display.close()
        writer.close()
    return records


def prepare_run_dir(r: Run) -> None:
    """Create (or, with --overwrite, replace) the run directory and write the resolved recipe into it (rank 0)."""
    r.dist.barrier()  # every rank has checked output.dir before rank 0 changes it
    if r.dist.is_main:
        _create_run_dir(r)
    r.dist.barrier()


def _create_run_dir(r: Run) -> None:
    if r.run_dir.exists():
        shutil.rmtree(r.run_dir)  # check_output_dir allowed it: --overwrite of a psft-lite run dir
    try:
        r.run_dir.mkdir(parents=True)
        (r.run_dir / RUN_MARKER).write_text(r.recipe.to_toml(), encoding="utf-8")
    except OSError as e:
        shutil.rmtree(r.run_dir, ignore_errors=True)
        raise RecipeError(f"output.dir {r.run_dir}: cannot write there ({e.strerror}); choose another output.dir.") from None
    try:
        check_disk_space(r)  # measured on the run dir's own file system, so only once it exists
    except RecipeError:
        shutil.rmtree(r.run_dir, ignore_errors=True)
        raise


def check_disk_space(r: Run) -> None:
    """Fail before training when the checkpoints this run will keep cannot fit on the disk."""
    n = sum(p.numel() for p in modeling.trainable_parameters(r.model))
    per_checkpoint = n * 4 * 3 + 2**20  # adapter + two AdamW moments, float32, plus small files
    need = per_checkpoint * (max(r.recipe.train.keep_last, 1) + 2)  # kept + the one being written + the adapter
    free = shutil.disk_usage(r.run_dir).free
    if free < need:
        raise RecipeError(
            f"output.dir {r.run_dir}: {free / 2**20:.0f} MB free, but this run's checkpoints need about "
            f"{need / 2**20:.0f} MB. Free some space, lower train.keep_last, or choose another output.dir."
        )


def adapter_meta(r: Run, step: int) -> dict[str, Any]:
    return {
        "base_model": r.recipe.model.model_dump(mode="json", exclude_none=True),
        "objective": r.recipe.objective.kind,
        "step": step,
        "dtype": str(r.dtype).removeprefix("torch."),
    }


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records after `step` (written after the checkpoint a run resumes from), atomically."""
    if not path.exists():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines() if _record_step(line) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    os.replace(tmp, path)


def _record_step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return math.inf  # a torn line from a killed run: drop it


def resume_point(r: Run, spec: str) -> int:
    """Load the checkpoint `spec` names into the run; returns the number of steps it had completed."""
    path = find_checkpoint(r.run_dir, spec)
    saved = load_recipe(path / "recipe.toml")
    diffs = math_differences(saved, r.recipe)
    if diffs:
        key, old, new = diffs[0]
        more = f" (and {len(diffs) - 1} more: {', '.join(d[0] for d in diffs[1:4])})" if len(diffs) > 1 else ""
        raise RecipeError(
            f"--resume: the checkpoint {path} was trained with {key} = {old!r}, but the recipe now says {new!r}{more}. "
            "Resuming would not continue the same run; restore the key, or start a new run in another output.dir."
        )
    state, policy_state = load_checkpoint(path, r.model, r.optimizer)
    if state.data and state.data != r.data_identity():
        raise RecipeError(f"--resume: the training data changed since {path} ({state.data} vs {r.data_identity()}).")
    if r.policy is not None:
        r.policy.load_state_dict(policy_state)
    if state.step >= r.total_steps:
        raise RecipeError(
            f"--resume: {path} is at step {state.step}, and the recipe asks for {r.total_steps} steps in all; "
            "raise train.max_steps (or train.epochs) to train further."
        )
    if saved.train.schedule != "constant" and saved.train.max_steps != r.recipe.train.max_steps:
        r.console.print("[yellow]warning:[/yellow] the run length changed, so the lr schedule differs from the original run's.")
    r.guard.load_state_dict(state.guard)
    r.dist.barrier()
    if r.dist.is_main:
        truncate_metrics(r.run_dir / "metrics.jsonl", state.step)
    return state.step


def run(recipe: Recipe, console: Console | None = None, overwrite: bool = False, resume: str | None = None) -> dict[str, Any]:
    """Train as the recipe says (or continue from a checkpoint); returns a summary (paths, steps, time)."""
    console = console or Console(stderr=True)
    dist = distributed.init_from_env()
    try:
        return _run(recipe, console if dist.is_main else Console(quiet=True), overwrite, resume, dist)
    finally:
        distributed.shutdown()


def _run(recipe: Recipe, console: Console, overwrite: bool, resume: str | None, dist: Dist) -> dict[str, Any]:
    t_start = time.perf_counter()
    r = build(recipe, console, overwrite=overwrite, resuming=resume is not None, dist=dist)
    n_train = sum(p.numel() for p in modeling.trainable_parameters(r.model))
    o = recipe.objective
    what = o.kind + (f" ({o.old_policy}, K={o.refresh_every})" if o.kind == "psft" and o.old_policy == "snapshot" else "")
    what += " (base)" if o.kind == "psft" and o.old_policy == "base" else ""
    console.print(
        f"model: {recipe.model.name} on {r.device.type}, {str(r.dtype).removeprefix('torch.')}"
        + (", 4-bit NF4 base" if recipe.model.load_in_4bit else "")
        + f"; LoRA r={recipe.lora.r}, {n_train:,} trainable parameters"
    )
    console.print(f"objective: {what}; {r.total_steps} steps of {recipe.train.batch_size} sequences "
                  f"(micro-batch {recipe.train.micro_batch_size}), lr {recipe.train.lr:g}"
                  + (f"; data-parallel over {dist.world} processes" if dist.enabled else ""))  # fmt: skip
    start = 0
    if resume is not None:
        start = resume_point(r, resume)
        if dist.is_main:
            (r.run_dir / RUN_MARKER).write_text(r.recipe.to_toml(), encoding="utf-8")
        console.print(f"resuming at step {start} of {r.total_steps}")
    else:
        prepare_run_dir(r)
    t_loop = time.perf_counter()
    records = train_loop(r, start)
    loop_s = time.perf_counter() - t_loop
    adapter = r.run_dir / "adapter"
    if dist.is_main:
        try:
            save_adapter(r.model, r.tokenizer, adapter, adapter_meta(r, r.total_steps))
        except OSError as e:
            raise RunError(f"could not write the adapter into {r.run_dir} ({e.strerror}); the last checkpoint is intact.") from None
    dist.barrier()
    summary = {
        "run_dir": str(r.run_dir),
        "adapter": str(adapter),
        "metrics": str(r.run_dir / "metrics.jsonl"),
        "steps": r.total_steps - start,
        "train_s": loop_s,
        "total_s": time.perf_counter() - t_start,
        "peak_mem_mb": peak_memory_mb(r.device),
        "first": records[0] if records else None,
        "last": records[-1] if records else None,
        "main": dist.is_main,
    }
    if recipe.output.save == "merged" and dist.is_main:
        from psft_lite.merge import merge

        del r.model, r.optimizer
        report = merge(adapter, out=r.run_dir / "merged", console=console)
        summary["merged"] = str(report["out"])
    return summary
