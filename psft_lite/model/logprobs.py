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
    = p − q), so the backward pass recomputes each chunk's logits once instead of once per quantity. On a CPU the
    vocabulary-sized elementwise passes, not the matmuls, are most of the cost, so each chunk makes as few as it can:
    one exp per distribution, log-probabilities as z − logsumexp with the row's logsumexp kept from the forward pass,
    the reverse KL from the entropy already computed (KL(p‖q) = −H(p) − Σ p·log q), row dot products without
    temporaries, and the gradient built in place. Memory stays a few [chunk × V] float32 blocks at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ref, kl, topk, chunk, softcap, scale):  # type: ignore[override]
        n = hidden.shape[0]
        logp, ent, kls, htop, lse, lse_ref = (hidden.new_zeros(n, dtype=torch.float32) for _ in range(6))
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, chunk):
                e = slice(s, s + chunk)
                z, _ = _chunk_logits(hidden[e], weight, bias, softcap, scale)
                if topk > 1:
                    top = torch.log_softmax(z.topk(topk, dim=-1).values, -1)
                    htop[e] = -(top.exp() * top).sum(-1) / math.log(topk)
                lse[e] = torch.logsumexp(z, -1)
                ls = z.sub_(lse[e, None])  # log p, in z's memory
                p = ls.exp()
                logp[e] = ls.gather(1, targets[e, None]).squeeze(1)
                ent[e] = -torch.linalg.vecdot(p, ls)
                if kl:
                    zr, _ = _chunk_logits(ref[e], weight, bias, softcap, scale)
                    lse_ref[e] = torch.logsumexp(zr, -1)
                    lq = zr.sub_(lse_ref[e, None])  # computed as log p is: equal states give a KL of exactly 0
                    if kl == 1:  # KL(p ‖ q) = −H(p) − Σ p·log q
                        kls[e] = -ent[e] - torch.linalg.vecdot(p, lq)
                    else:  # KL(q ‖ p) = Σ q·log q − Σ q·log p
                        q = lq.exp()
                        kls[e] = torch.linalg.vecdot(q, lq) - torch.linalg.vecdot(q, ls)
        ctx.save_for_backward(
            hidden,
            weight,
            bias if bias is not None else torch.empty(0),
            targets,
            ref if kl else torch.empty(0),
            lse,
            lse_ref,
            kls,
        )
        ctx.has_bias, ctx.kl, ctx.chunk, ctx.softcap, ctx.scale = bias is not None, kl, chunk, softcap, scale
        ctx.mark_non_differentiable(ent, htop)
        return logp, ent, kls, htop

    @staticmethod
    def backward(ctx, g_logp, _g_ent, g_kl, _g_top):  # type: ignore[override]
        hidden, weight, bias, targets, ref, lse, lse_ref, kls = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        use_kl = bool(ctx.kl) and g_kl is not None
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], ctx.chunk):
                e = slice(s, s + ctx.chunk)
                h = hidden[e]
                z, dz_draw = _chunk_logits(h, weight, bias, ctx.softcap, ctx.scale)
                ls = z.sub_(lse[e, None])
                p = ls.exp()
                g = g_logp[e].float()[:, None] if g_logp is not None else p.new_zeros(p.shape[0], 1)
                if use_kl:
                    gk = g_kl[e].float()[:, None]
                    zr, _ = _chunk_logits(ref[e], weight, bias, ctx.softcap, ctx.scale)
                    lq = zr.sub_(lse_ref[e, None])
                    if ctx.kl == 1:  # p·(gk·(log p − log q − KL) − g)
                        gz = ls.sub_(lq).mul_(gk).add_(-gk * kls[e, None] - g).mul_(p)
                    else:  # p·(gk − g) − gk·q
                        gz = p.mul(gk - g).sub_(lq.exp_().mul_(gk))
                else:
                    gz = p.mul_(-g)
                gz.scatter_add_(1, targets[e, None], g)
                if dz_draw is not None:
                    gz = gz * dz_draw
                if need_h:
                    grad_h[e] = (gz.to(weight.dtype) @ weight).to(hidden.dtype)
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
