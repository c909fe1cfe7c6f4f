"""Training objectives as pure tensor functions (METHODS.md §1–§4, §6). No model, no I/O.

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
# Per-token log-probs and entropy from hidden states, chunked (DESIGN.md: never a [B × L × V] float32 tensor)


class _TargetLogProbs(torch.autograd.Function):
    """log p(target) and entropy for N positions, computing the LM head in chunks of rows.

    Forward keeps only the hidden states; backward recomputes each chunk's logits. Peak extra memory is one
    [chunk × V] float32 block instead of [N × V] saved for autograd. Entropy is returned as a statistic (no gradient).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, softcap, scale):  # type: ignore[override]
        n = hidden.shape[0]
        logp = hidden.new_empty(n, dtype=torch.float32)
        ent = hidden.new_empty(n, dtype=torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, chunk):
                z, _ = _chunk_logits(hidden[s : s + chunk], weight, bias, softcap, scale)
                lse = torch.logsumexp(z, dim=-1)
                logp[s : s + chunk] = z.gather(1, targets[s : s + chunk, None]).squeeze(1) - lse
                p = torch.exp(z - lse[:, None])
                ent[s : s + chunk] = lse - (p * z).sum(-1)
        ctx.save_for_backward(hidden, weight, bias if bias is not None else torch.empty(0), targets)
        ctx.has_bias, ctx.chunk, ctx.softcap, ctx.scale = bias is not None, chunk, softcap, scale
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, _g_ent):  # type: ignore[override]
        hidden, weight, bias, targets = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], ctx.chunk):
                h = hidden[s : s + ctx.chunk]
                z, dz_draw = _chunk_logits(h, weight, bias, ctx.softcap, ctx.scale)
                g = g_logp[s : s + ctx.chunk].float()
                # d log p_t / dz = onehot(t) − softmax(z)
                gz = -torch.softmax(z, dim=-1) * g[:, None]
                gz.scatter_add_(1, targets[s : s + ctx.chunk, None], g[:, None])
                if dz_draw is not None:
                    gz = gz * dz_draw
                if need_h:
                    grad_h[s : s + ctx.chunk] = (gz.to(weight.dtype) @ weight).to(hidden.dtype)
                if need_w:
                    grad_w += gz.t() @ h.float()
                if need_b:
                    grad_b += gz.sum(0)
        return (
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            None, None, None, None,
        )  # fmt: skip


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None, scale: float) -> tuple[Tensor, Tensor | None]:
    """float32 logits of a chunk, and d(logits)/d(raw logits) when a non-linear soft-cap is applied."""
    z = (h.to(weight.dtype) @ weight.t()).float()
    if bias is not None:
        z = z + bias.float()
    if scale != 1.0:
        z = z * scale
    if softcap:
        t = torch.tanh(z / softcap)
        return softcap * t, (1 - t * t) * scale
    return z, (torch.full_like(z[:1, :1], scale) if scale != 1.0 else None)


def target_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    mask: Tensor,
    bias: Tensor | None = None,
    chunk: int = 1024,
    softcap: float | None = None,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Per-token log p(target) and entropy for the masked positions of a padded batch.

    hidden:  [B, L, H] final hidden states; position t predicts targets[:, t]
    weight:  [V, H] LM head (bias [V] optional; `softcap`/`scale` for models that transform logits)
    targets: [B, L] long; mask: [B, L] bool — only masked positions go through the head
    returns: (logp [B, L] float32 with grad, entropy [B, L] float32 detached), zero where mask is False
    """
    flat = mask.nonzero(as_tuple=True)
    logp_sel, ent_sel = _TargetLogProbs.apply(hidden[flat], weight, bias, targets[flat], chunk, softcap, scale)
    logp = hidden.new_zeros(mask.shape, dtype=torch.float32).index_put(flat, logp_sel)
    ent = hidden.new_zeros(mask.shape, dtype=torch.float32).index_put(flat, ent_sel)
    return logp, ent


def logprobs_from_logits(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Reference (unchunked) path: per-token log p(target) and entropy from full logits [..., V]."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    logsm = torch.log_softmax(logits, dim=-1)
    logp = logsm.gather(-1, targets[..., None]).squeeze(-1)
    ent = -(logsm.exp() * logsm).sum(-1)
    return logp, ent.detach()


# ---------------------------------------------------------------------------------------------------------------------
# Normalisation (METHODS.md §6)


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
# Losses


def sft_loss(logp: Tensor, mask: Tensor, weights: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """METHODS.md §1: ℓ_t = −log p_t."""
    return -(weights * logp).sum(), {}


def dft_loss(logp: Tensor, mask: Tensor, weights: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """METHODS.md §4 with λ = 0: ℓ_t = −sg[p_t] · log p_t (Dynamic Fine-Tuning)."""
    return -(weights * logp.detach().exp() * logp).sum(), {}


def idft_loss(
    logp: Tensor,
    entropy: Tensor,
    mask: Tensor,
    weights: Tensor,
    beta: float = 1.0,
    gamma_min: float = 0.1,
    gamma_max: float = 2.0,
    lam: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """METHODS.md §4: φ = log p + H; γ = 1 + λ(clamp(exp(−φ/β), γ_min, γ_max) − 1); ℓ_t = −sg[p^γ] · log p."""
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
    old_logp: Tensor,
    mask: Tensor,
    weights: Tensor,
    clip_high: float = 0.28,
    clip_low: float = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """METHODS.md §2: ℓ_t = −min(r_t·A, clip(r_t, 1−ε_low, 1+ε_high)·A) with A = 1, i.e. −min(r_t, 1+ε_high).

    r_t = exp(clamp(log p_t − log p_old,t, −20, 20)); the gradient is −r_t ∇log p_t while r_t < 1+ε_high and
    exactly zero once a token's probability has risen more than (1+ε_high)× above the old policy's.
    """
    log_ratio = (logp - old_logp.detach()).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    surrogate = torch.minimum(ratio, ratio.clamp(1 - clip_low, 1 + clip_high))  # advantage A = 1
    loss = -(weights * surrogate).sum()
    r = ratio.detach()
    stats = {
        "clip_frac": _mean((r > 1 + clip_high).to(r.dtype), mask),
        "ratio_mean": _mean(r, mask),
        "ratio_max": torch.where(mask.bool(), r, torch.zeros_like(r)).max(),
        "approx_kl": _mean(old_logp.detach() - logp.detach(), mask),
    }
    return loss, stats
