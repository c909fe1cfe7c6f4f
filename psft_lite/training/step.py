"""One optimizer step (docs/METHODS.md §2, §6):

    old-policy log-probs for the step's micro-batches (psft) → for each micro-batch: forward, loss weighted by the
    step's trained-token count, backward → all-reduce, clip → optimizer step (skipped on NaN/inf) → one record.

fp16 loss scaling, the guard's veto and the optimizer update sit behind `Updater`, so the step reads as the algorithm.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from psft_lite.data.batching import Batch
from psft_lite.model import scoring
from psft_lite.model.logprobs import Reference
from psft_lite.tracking.metrics import StepStats
from psft_lite.training.build import Run
from psft_lite.training.losses import token_weights
from psft_lite.training.schedules import idft_lambda, lr_at
from psft_lite.training.sharding import full


class Updater:
    """Backward, unscale, optimizer step and zeroing, with fp16 dynamic loss scaling when a GradScaler is given.

    Under fp16 an overflowing gradient is routine: the scaler skips that update and lowers the scale by itself, so
    the guard is shown a zero grad norm for it rather than an alarm."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: Any = None) -> None:
        self.optimizer, self.scaler = optimizer, scaler

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones

    def overflowed(self, grad_norm: float) -> bool:
        return self.scaler is not None and not math.isfinite(grad_norm)

    def step(self, skip: str | None, overflow: bool) -> dict[str, float]:
        """Apply the update unless the guard said `skip`; returns the loss-scale fields of the record (fp16)."""
        if skip is None and self.scaler is not None:
            self.scaler.step(self.optimizer)
        elif skip is None:
            self.optimizer.step()
        extra: dict[str, float] = {}
        if self.scaler is not None:
            self.scaler.update()
            extra["loss_scale"] = float(self.scaler.get_scale())
            if overflow:
                extra["overflow"] = 1.0
        self.optimizer.zero_grad(set_to_none=True)
        return extra


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for g in optimizer.param_groups:
        g["lr"] = lr
    return lr


def old_logprobs(run: Run, step: int, batches: list[Batch]) -> list[torch.Tensor | None]:
    """The old policy's log-probs per micro-batch; None means the current policy (ratio 1: before psft starts)."""
    if run.policy is not None and step >= run.recipe.objective.sft_warmup_steps:
        return run.policy.old_logprobs(step, batches)
    return [None] * len(batches)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.float()
    return (x * m).sum() / m.sum()


def micro_step(
    run: Run, b: Batch, old: torch.Tensor | None, lam: float, n_tok: int, n_seq: int
) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor]:
    """Forward one micro-batch and compute its share of the step's loss; returns (loss, stats, log-probs)."""
    o, spec = run.recipe.objective, run.objective
    topk = getattr(o, spec.topk_key) if spec.topk_key else 0
    kl = spec.kl if "kl_base" in spec.inputs else None
    with run.amp():  # one fused head: the KL to the base and the top-k entropy when the objective reads them
        ref = reference(run, b) if kl else None
        out = scoring.response_outputs(run.model, b, kl=kl, topk=topk, ref=ref)
    logp, ent = out["logp"], out["entropy"]
    mask = b.target_mask
    weights = token_weights(mask, o.normalize, n_tok, n_seq, seq_ids=b.seq_ids)
    old_logp = logp.detach() if old is None else old
    inputs = {
        "entropy": ent,
        "old_logp": old_logp,
        "lam": lam,
        "kl_base": out["kl"],
        "topk_entropy": out["topk_entropy"],
    }
    params = {k: getattr(o, k) for k in spec.params}
    loss, s = spec.fn(logp, mask=mask, weights=weights, **{k: inputs[k] for k in spec.inputs}, **params)
    s = {**s, "nll": -masked_mean(logp.detach(), mask), "entropy": masked_mean(ent, mask)}
    return loss, s, logp.detach()


def reference(run: Run, b: Batch) -> Reference:
    """The base's distribution for a micro-batch (its hidden states, or its top-k and tail mass when
    `objective.reference_top_k` > 0): from the reference cache when every example in it was seen before, else one
    adapter-off forward (whose result the cache then keeps)."""
    cached = run.reference.get(b) if run.reference is not None else None
    if cached is not None:
        return cached
    ref = scoring.base_reference(run.model, b, run.recipe.objective.reference_top_k)
    if run.reference is not None:
        run.reference.put(b, ref)
    return ref


def train_step(run: Run, step: int) -> dict[str, Any]:
    """One optimizer step; returns its metrics record (without timing)."""
    spec, update = run.objective, Updater(run.optimizer, run.scaler)
    lr = set_lr(run.optimizer, lr_at(step, run.total_steps, run.recipe.train))
    batches = run.step_batches(step)
    n_tok, n_seq, n_all = run.data.totals(step)  # the whole step, over all ranks: normalisation is global
    olds = old_logprobs(run, step, batches)
    lam = idft_lambda(step, run.total_steps, run.recipe.objective)
    base_lp = sample_base_logprobs(run, step, batches[0]) if batches else None
    stats, drift = StepStats(), None
    for i, (b, old) in enumerate(zip(batches, olds)):
        loss, s, logp = micro_step(run, b, old, lam, n_tok, n_seq)
        update.backward(loss)
        stats.add(s, b.n_trained, float(loss.detach()))
        if i == 0 and base_lp is not None:
            drift = float(masked_mean(logp - base_lp, b.target_mask))
    trainable = scoring.trainable_parameters(run.model)
    run.dist.all_reduce_grads(trainable)
    stats.reduce(run.dist, ["nll", "entropy", *spec.stats], list(spec.max_stats))
    update.unscale()
    clip = run.recipe.train.grad_clip
    grad_norm = float(full(torch.nn.utils.clip_grad_norm_(trainable, clip if clip > 0 else float("inf"))))
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
    drift = step_drift(run, record, drift)
    if drift is not None:
        record["drift"] = drift
    overflow = update.overflowed(grad_norm)
    skip = run.guard.check_step({**record, "grad_norm": 0.0} if overflow else record)
    if skip is not None:
        record["skipped"] = skip
    record.update(update.step(skip, overflow))
    return record


def step_drift(run: Run, record: dict[str, Any], drift: float | None) -> float | None:
    """The step's drift from the base (log-prob gain on trained tokens), averaged over ranks; free when the old
    policy is the base (−approx_kl)."""
    if run.dist.enabled and run.recipe.guard.drift_watch:
        d = run.dist.all_reduce(torch.tensor([drift or 0.0, float(drift is not None)], dtype=torch.float64))
        drift = float(d[0] / d[1]) if d[1] > 0 else None
    if run.policy is not None and run.policy.is_base and "approx_kl" in record:
        drift = -record["approx_kl"]
    return drift


def sample_base_logprobs(run: Run, step: int, b: Batch) -> torch.Tensor | None:
    """Base-model log-probs of one micro-batch every guard.drift_every steps, for the drift watch (an old policy that
    is the base needs none: its log-probs give the drift for free)."""
    g = run.recipe.guard
    free = run.policy is not None and run.policy.is_base
    if not g.drift_watch or not g.drift_every or free or (step + 1) % g.drift_every:
        return None
    with scoring.adapter_disabled(run.model), torch.no_grad(), run.amp():
        logp, _ = scoring.response_logprobs(run.model, b)
    return logp
