"""Learning-rate and IDFT-λ schedules: pure functions of the step, so a resumed run needs no scheduler state."""

from __future__ import annotations

import math

from psft_lite.recipe.schema import ObjectiveSection, TrainSection


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
    """IDFT's λ: 0 during the warm-up fraction, then linear to 1 over the transition fraction (docs/METHODS.md §4)."""
    frac = step / max(1, total)
    if frac < o.lambda_warmup:
        return 0.0
    if o.lambda_transition <= 0:
        return 1.0
    return min(1.0, (frac - o.lambda_warmup) / o.lambda_transition)
