"""Per-token log-probs and entropies of target tokens from hidden states, with the LM head run in chunks.

Never materialise a [B × L × V] float32 tensor when only the trained tokens' log-probs and entropies are
needed. `target_logprobs` runs the head over the masked positions only, a chunk of rows at a time, and recomputes
each chunk's logits in the backward pass; `kl_to_reference` does the same for KL(p ‖ p_ref) between two sets of
hidden states, with a gradient (sft_kl's penalty) or under no_grad (eval's KL to the base).
`logprobs_from_logits` is the unchunked reference the tests compare against.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


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
            None,
            None,
            None,
            None,
        )


def _chunk_logits(
    h: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None, scale: float
) -> tuple[Tensor, Tensor | None]:
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


def _kl_chunk(
    h: Tensor, h_ref: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None, scale: float
) -> Tensor:
    """KL(softmax(head(h)) ‖ softmax(head(h_ref))) per row of one chunk, in float32."""
    with torch.autocast(h.device.type, enabled=False):
        lq = torch.log_softmax(_chunk_logits(h, weight, bias, softcap, scale)[0], -1)
        lr = torch.log_softmax(_chunk_logits(h_ref, weight, bias, softcap, scale)[0], -1)
        return (lq.exp() * (lq - lr)).sum(-1)


def kl_to_reference(
    hidden: Tensor,
    ref_hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    chunk: int = 1024,
    softcap: float | None = None,
    scale: float = 1.0,
) -> Tensor:
    """KL(p ‖ p_ref) per row [N], float32, **with** gradient through `hidden` (the model being trained); `ref_hidden`
    is a constant (e.g. the adapter-disabled base at the same positions). Each [chunk × V] block is recomputed in the
    backward pass (activation checkpointing), so memory stays one block, as in `target_logprobs`."""
    from torch.utils.checkpoint import checkpoint

    ref_hidden = ref_hidden.detach()
    parts = [
        checkpoint(
            _kl_chunk,
            hidden[s : s + chunk],
            ref_hidden[s : s + chunk],
            weight,
            bias,
            softcap,
            scale,
            use_reentrant=False,
        )
        for s in range(0, hidden.shape[0], chunk)
    ]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------------
# The fused head: log p(target), entropy, KL to a reference (either direction) and top-k entropy in one pass


class _FusedHead(torch.autograd.Function):
    """Per trained position, from one computation of its logits per chunk: log p(target) (with gradient), entropy,
    KL between the policy p and a reference q = softmax(head(ref_hidden)) (with gradient; `kl` = 1 for KL(p ‖ q),
    2 for KL(q ‖ p), 0 for none) and the entropy of the top-k logits renormalised, over ln k (`topk` > 1; EAFT).

    Gradients are written out (d log p_t/dz = onehot − p; d KL(p‖q)/dz = p·(log p − log q − KL); d KL(q‖p)/dz
    = p − q), so the backward pass recomputes each chunk's logits once instead of once per quantity. Memory stays one
    [chunk × V] float32 block at a time, as in `_TargetLogProbs`."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ref, kl, topk, chunk, softcap, scale):  # type: ignore[override]
        n = hidden.shape[0]
        logp, ent, kls, htop = (hidden.new_zeros(n, dtype=torch.float32) for _ in range(4))
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, chunk):
                z, _ = _chunk_logits(hidden[s : s + chunk], weight, bias, softcap, scale)
                ls = torch.log_softmax(z, -1)  # as the reference's: a policy equal to it has a KL of exactly 0
                p = ls.exp()
                logp[s : s + chunk] = ls.gather(1, targets[s : s + chunk, None]).squeeze(1)
                ent[s : s + chunk] = -(p * ls).sum(-1)
                if kl:
                    lq = torch.log_softmax(_chunk_logits(ref[s : s + chunk], weight, bias, softcap, scale)[0], -1)
                    kls[s : s + chunk] = (p * (ls - lq)).sum(-1) if kl == 1 else (lq.exp() * (lq - ls)).sum(-1)
                if topk > 1:
                    top = torch.log_softmax(z.topk(topk, dim=-1).values, -1)
                    htop[s : s + chunk] = -(top.exp() * top).sum(-1) / math.log(topk)
        saved = (hidden, weight, bias if bias is not None else torch.empty(0), targets, ref if kl else torch.empty(0))
        ctx.save_for_backward(*saved)
        ctx.has_bias, ctx.kl, ctx.chunk, ctx.softcap, ctx.scale = bias is not None, kl, chunk, softcap, scale
        ctx.mark_non_differentiable(ent, htop)
        return logp, ent, kls, htop

    @staticmethod
    def backward(ctx, g_logp, _g_ent, g_kl, _g_top):  # type: ignore[override]
        hidden, weight, bias, targets, ref = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], ctx.chunk):
                h = hidden[s : s + ctx.chunk]
                z, dz_draw = _chunk_logits(h, weight, bias, ctx.softcap, ctx.scale)
                ls = torch.log_softmax(z, -1)
                p = ls.exp()
                g = g_logp[s : s + ctx.chunk].float()
                gz = -p * g[:, None]
                gz.scatter_add_(1, targets[s : s + ctx.chunk, None], g[:, None])
                if ctx.kl and g_kl is not None:
                    gk = g_kl[s : s + ctx.chunk].float()[:, None]
                    lq = torch.log_softmax(
                        _chunk_logits(ref[s : s + ctx.chunk], weight, bias, ctx.softcap, ctx.scale)[0], -1
                    )
                    if ctx.kl == 1:  # KL(p ‖ q)
                        d = ls - lq
                        gz += gk * p * (d - (p * d).sum(-1, keepdim=True))
                    else:  # KL(q ‖ p)
                        gz += gk * (p - lq.exp())
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
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


KL_DIRECTIONS = {"reverse": 1, "forward": 2}  # KL(p_θ ‖ p_ref) (sft_kl) or KL(p_ref ‖ p_θ) (ASFT's code)


def head_outputs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    mask: Tensor,
    bias: Tensor | None = None,
    ref_hidden: Tensor | None = None,
    kl: str | None = None,
    topk: int = 0,
    chunk: int = 1024,
    softcap: float | None = None,
    scale: float = 1.0,
) -> dict[str, Tensor]:
    """The fused head on a padded batch: `logp` (with gradient), `entropy`, and, when asked, `kl` (to the reference
    hidden states `ref_hidden` [B, L, H], direction `kl`, with gradient) and `topk_entropy` — each [B, L] float32,
    zero where `mask` is False."""
    flat = mask.nonzero(as_tuple=True)
    ref = ref_hidden[flat] if ref_hidden is not None else None
    code = KL_DIRECTIONS[kl] if kl else 0
    if code and ref is None:
        raise ValueError("head_outputs: a KL needs ref_hidden")
    parts = _FusedHead.apply(hidden[flat], weight, bias, targets[flat], ref, code, topk, chunk, softcap, scale)
    names = ("logp", "entropy", "kl", "topk_entropy")
    return {name: hidden.new_zeros(mask.shape, dtype=torch.float32).index_put(flat, v) for name, v in zip(names, parts)}
