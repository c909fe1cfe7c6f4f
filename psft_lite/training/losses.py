"""The training objectives' losses as pure tensor functions (docs/METHODS.md §1–§4, §6, §9). No model, no I/O; the
table that names them and says what each reads is `objectives.py`.

Shapes: every per-token tensor is [B, T] with T the padded sequence length; `mask` marks trained tokens; `weights`
are the per-token normalisation weights of an optimizer step (`token_weights`), so a loss is Σ weights·ℓ and
summing micro-batch losses over gradient accumulation gives exactly the step's token- or sequence-mean.

Each loss returns `(loss, stats)`; stats are detached token-means over this micro-batch's trained tokens (names
ending in `_max` are maxima), which `metrics.StepStats` combines across micro-batches.
"""

from __future__ import annotations

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------------------------------
# Normalisation (docs/METHODS.md §6)


def token_weights(
    mask: Tensor,
    normalize: str,
    n_tokens: int | None = None,
    n_seqs: int | None = None,
    dtype: torch.dtype = torch.float32,
    seq_ids: Tensor | None = None,
) -> Tensor:
    """Per-token weights so that Σ weights·ℓ over an optimizer step is its token-mean or sequence-mean.

    Pass the whole step's `n_tokens` (trained tokens) or `n_seqs` (sequences with any trained token) when the step
    is split into micro-batches; the defaults normalise over this tensor alone. For packed rows, `seq_ids` [B, L]
    says which sequence of its row each token belongs to, so a sequence-mean is over sequences, not rows.
    """
    m = mask.to(dtype)
    if normalize == "token":
        return m / (n_tokens if n_tokens is not None else m.sum().clamp(min=1))
    if normalize == "sequence":
        if seq_ids is None:
            per_seq = m.sum(-1, keepdim=True)
            seqs = n_seqs if n_seqs is not None else int((per_seq > 0).sum())
        else:
            flat = (torch.arange(m.shape[0], device=m.device)[:, None] * m.shape[1] + seq_ids).flatten()
            counts = torch.zeros(m.numel(), dtype=dtype, device=m.device).index_add_(0, flat, m.flatten())
            per_seq = counts[flat].view_as(m)
            seqs = n_seqs if n_seqs is not None else int((counts > 0).sum())
        return m / per_seq.clamp(min=1) / max(seqs, 1)
    raise ValueError(f"unknown normalisation {normalize!r}")


def _mean(x: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------------------------------
# Losses. Hyper-parameters are keyword-only and have no defaults here: the recipe schema holds the defaults.


def sft_loss(logp: Tensor, *, mask: Tensor, weights: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """docs/METHODS.md §1: ℓ_t = −log p_t."""
    return -(weights * logp).sum(), {}


def sft_kl_loss(
    logp: Tensor, *, mask: Tensor, weights: Tensor, kl_base: Tensor, kl_coef: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """docs/METHODS.md §1b: ℓ_t = −log p_t + β·KL(π_θ(·|s_t) ‖ π_base(·|s_t)), the KL over the full vocabulary at
    each trained position (with gradient), β = `kl_coef`: SFT regularised towards the base model."""
    return (weights * (kl_coef * kl_base - logp)).sum(), {"kl_base": _mean(kl_base.detach(), mask)}


def asft_loss(
    logp: Tensor, *, mask: Tensor, weights: Tensor, kl_base: Tensor, asft_kl_coef: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """docs/METHODS.md §9 (ASFT, arXiv 2509.23753): ℓ_t = −sg[p_t]·log p_t + λ·KL(π_base ‖ π_θ), DFT's weighting
    anchored to the base by the *forward* KL over the full vocabulary (the direction of the paper's code, which
    LLaMA-Factory and Unsloth follow; the paper's text writes it reversed), λ = `asft_kl_coef`."""
    dft = -(logp.detach().exp() * logp)
    return (weights * (dft + asft_kl_coef * kl_base)).sum(), {"kl_base": _mean(kl_base.detach(), mask)}


def eaft_loss(
    logp: Tensor, *, mask: Tensor, weights: Tensor, topk_entropy: Tensor, eaft_alpha: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """docs/METHODS.md §9 (EAFT, arXiv 2601.02151): ℓ_t = −sg[H̃_t^α]·log p_t, H̃_t the entropy of the model's own
    top-k logits (renormalised) over ln k, so a token the model is confidently wrong about ("a confident conflict":
    low entropy, low probability) is damped. k = `eaft_top_k` (20), α = `eaft_alpha` (1)."""
    weight = topk_entropy.detach().clamp(min=0) ** eaft_alpha
    return -(weights * weight * logp).sum(), {"eaft_weight": _mean(weight, mask)}


def dft_loss(logp: Tensor, *, mask: Tensor, weights: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """docs/METHODS.md §4 with λ = 0: ℓ_t = −sg[p_t] · log p_t (Dynamic Fine-Tuning)."""
    return -(weights * logp.detach().exp() * logp).sum(), {}


def idft_loss(
    logp: Tensor,
    *,
    entropy: Tensor,
    mask: Tensor,
    weights: Tensor,
    beta: float,
    gamma_min: float,
    gamma_max: float,
    lam: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """docs/METHODS.md §4: φ = log p + H; γ = 1 + λ(clamp(exp(−φ/β), γ_min, γ_max) − 1); ℓ_t = −sg[p^γ] · log p."""
    lp = logp.detach()
    phi = lp + entropy
    gamma_raw = torch.exp(-phi / beta).clamp(gamma_min, gamma_max)
    gamma = 1 + lam * (gamma_raw - 1)
    weight = torch.exp(gamma * lp)  # p^γ, a constant
    loss = -(weights * weight * logp).sum()
    phi_mean = _mean(phi, mask)
    stats = {
        "phi_mean": phi_mean,
        "phi_std": (_mean((phi - phi_mean) ** 2, mask)).sqrt(),
        "gamma_mean": _mean(gamma, mask),
        "weight_mean": _mean(weight, mask),
    }
    return loss, stats


def psft_loss(
    logp: Tensor,
    *,
    old_logp: Tensor,
    mask: Tensor,
    weights: Tensor,
    clip_high: float,
    clip_low: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """docs/METHODS.md §2: ℓ_t = −min(r_t·A, clip(r_t, 1−ε_low, 1+ε_high)·A) with A = 1, i.e. −min(r_t, 1+ε_high).

    r_t = exp(clamp(log p_t − log p_old,t, −20, 20)); the gradient is −r_t ∇log p_t while r_t < 1+ε_high and
    exactly zero once a token's probability has risen more than (1+ε_high)× above the old policy's.
    """
    log_ratio = (logp - old_logp.detach()).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    surrogate = torch.minimum(ratio, ratio.clamp(1 - clip_low, 1 + clip_high))  # advantage A = 1
    loss = -(weights * surrogate).sum()
    ratio = ratio.detach()
    stats = {
        "clip_frac": _mean((ratio > 1 + clip_high).to(ratio.dtype), mask),
        "ratio_mean": _mean(ratio, mask),
        "ratio_max": torch.where(mask.bool(), ratio, torch.zeros_like(ratio)).max(),
        "approx_kl": _mean(old_logp.detach() - logp.detach(), mask),
    }
    return loss, stats
