"""Per-token log-probs and entropies of target tokens from hidden states, with the LM head run in chunks.

Never materialise a [B × L × V] float32 tensor when only the trained tokens' log-probs and entropies are
needed. `target_logprobs` runs the head over the masked positions only, a chunk of rows at a time, and recomputes
each chunk's logits in the backward pass; `kl_to_reference` does the same for KL(p ‖ p_ref) between two sets of
hidden states, with a gradient (sft_kl's penalty) or under no_grad (eval's KL to the base).
`logprobs_from_logits` is the unchunked reference the tests compare against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

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
                lse, u, tot = _logsumexp_exp(z)
                logp[s : s + chunk] = z.gather(1, targets[s : s + chunk, None]).squeeze(1) - lse
                ent[s : s + chunk] = lse - torch.linalg.vecdot(u, z) / tot
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


def _logsumexp_exp(z: Tensor, inplace: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """`torch.logsumexp(z, -1)` computed as torch computes it (the row max, exp of the shifted logits, their sum, its
    log: bitwise equal), returned with the exponentials `u` = exp(z − max) and their sum `s`, so that p = u / s costs a
    division instead of a second vocabulary-wide exp — on a CPU the exp passes, not the head's matmul, are most of a
    head's elementwise cost. `inplace` overwrites z with u."""
    m = z.amax(-1, keepdim=True)
    m.masked_fill_(m.abs() == math.inf, 0)
    u = z.sub_(m).exp_() if inplace else (z - m).exp_()
    s = u.sum(-1)
    return s.log().add_(m.squeeze(-1)), u, s


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


@dataclass(frozen=True)
class Reference:
    """The base model's next-token distribution at N trained positions, in the form the KL reads it: its final hidden
    states `hidden` [N, H] — alone, the exact KL (the head recomputes all V of the base's logits) — or with its top-k
    (`reference_topk`): the logsumexp of its logits `lse` [N], its k most likely tokens `top_idx` [N, k] int32 with
    their log-probs `top_logq` [N, k], and the mass left outside them `tail_q` [N]."""

    hidden: Tensor | None = None
    lse: Tensor | None = None
    top_idx: Tensor | None = None
    top_logq: Tensor | None = None
    tail_q: Tensor | None = None

    @property
    def sparse(self) -> bool:
        return self.top_idx is not None

    def parts(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def __len__(self) -> int:
        return len(next(iter(self.parts().values())))

    def split(self, sizes: list[int]) -> list[Reference]:
        cols = {k: v.split(sizes) for k, v in self.parts().items()}
        return [Reference(**{k: c[i] for k, c in cols.items()}) for i in range(len(sizes))]

    def to(self, device: torch.device | str, copy: bool = False) -> Reference:
        return Reference(**{k: v.to(device, copy=copy) for k, v in self.parts().items()})

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.parts().values())

    @staticmethod
    def cat(refs: list[Reference]) -> Reference:
        return Reference(**{k: torch.cat([r.parts()[k] for r in refs]) for k in refs[0].parts()})


#: the model's own most likely tokens that join the base's k in the top-k KL (at most k of them)
MODEL_TOP = 16
_TINY = torch.finfo(torch.float32).tiny


def _tail_mass(p: Tensor, *named: Tensor) -> Tensor:
    """Σ p over the tokens not in any of `named` ([c, ·] ids) per row, summed directly — 1 − Σ p[named] would be
    float rounding once the named tokens hold nearly all the mass, and a ratio of two such tails (the forward KL's
    gradient) would be noise — floored at the smallest normal float. `p` is overwritten."""
    for idx in named:
        p.scatter_(1, idx, 0)
    return p.sum(-1).clamp_min(_TINY)


@torch.no_grad()
def reference_topk(
    hidden: Tensor,
    weight: Tensor,
    k: int,
    bias: Tensor | None = None,
    chunk: int = 1024,
    softcap: float | None = None,
    scale: float = 1.0,
    targets: Tensor | None = None,
) -> Reference:
    """The base's distribution at N positions (`hidden` [N, H]) as the top-k KL reads it: its states, its logsumexp,
    its k most likely tokens and the mass left outside them, computed with the fused head's own operations so that,
    for equal states, the KL is exactly 0. With `targets` [N], each position's trained token is always one of the k
    (in place of the k-th most likely when it is not among them): the token SFT pushes up is where the model leaves
    the base most, often deep in the base's tail (a format it never writes)."""
    n, k = hidden.shape[0], min(k, weight.shape[0])
    lse = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    idx = torch.zeros(n, k, dtype=torch.int32, device=hidden.device)
    lq = torch.zeros(n, k, dtype=torch.float32, device=hidden.device)
    tail = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        for s in range(0, n, chunk):
            e = slice(s, s + chunk)
            z, _ = _chunk_logits(hidden[e], weight, bias, softcap, scale)
            top = z.topk(k, dim=-1).indices
            if targets is not None:
                t = targets[e].long()
                missing = ~(top == t[:, None]).any(-1)
                top[missing, -1] = t[missing]
            zk = z.gather(1, top)
            lse[e], u, tot = _logsumexp_exp(z, inplace=True)  # bitwise the head's logsumexp: equal states, KL 0
            idx[e], lq[e] = top.to(torch.int32), zk - lse[e, None]
            # the tail from p = u / s elementwise, as the fused head sums the model's: equal states, equal tails
            tail[e] = _tail_mass(u.div_(tot[:, None]), top)
    return Reference(hidden=hidden, lse=lse, top_idx=idx, top_logq=lq, tail_q=tail)


def _logits_at(
    h: Tensor, weight: Tensor, bias: Tensor | None, idx: Tensor, softcap: float | None, scale: float
) -> Tensor:
    """float32 logits of rows `h` [c, H] at the token ids `idx` [c, m] only (as `_chunk_logits` computes them)."""
    z = torch.einsum("cmh,ch->cm", weight[idx].float(), h.float())
    if bias is not None:
        z = z + bias.float()[idx]
    if scale != 1.0:
        z = z * scale
    return softcap * torch.tanh(z / softcap) if softcap else z


class _FusedHead(torch.autograd.Function):
    """Per trained position, from one computation of its logits per chunk: log p(target) (with gradient), entropy,
    KL between the policy p and a reference q (with gradient; `kl` = 1 for KL(p ‖ q), 2 for KL(q ‖ p), 0 for none)
    and the entropy of the top-k logits renormalised, over ln k (`topk` > 1; EAFT).

    The reference is the base's hidden states (q = softmax(head(ref)), exact) or, when `Reference.sparse`, its top-k:
    then the KL is the one between p and q coarsened to the outcomes C — the base's k most likely tokens, the model's
    own 16 most likely (their log q from 16 dot products with the base's cached states) — and one bucket for the
    rest: Σ_C p log(p/q) + P_tail log(P_tail/Q_tail) (reverse; forward swaps p and q). A lower bound on the full KL
    that equals it when the model's and the base's tails have the same shape, and that needs no pass of the base's
    head and no vocabulary-wide pass beyond what log p already makes: its gradient is p_j·(log(P_tail/Q_tail) − KL)
    on every tail token (one multiply, as sft's) with a correction on C.

    Gradients are written out (d log p_t/dz = onehot − p; d KL(p‖q)/dz = p·(log p − log q − KL); d KL(q‖p)/dz
    = p − q), so the backward pass recomputes each chunk's logits once instead of once per quantity. On a CPU the
    vocabulary-sized elementwise passes, not the matmuls, are most of the cost, so each chunk makes as few as it can:
    one exp per distribution, log-probabilities as z − logsumexp with the row's logsumexp kept from the forward pass,
    the reverse KL from the entropy already computed (KL(p‖q) = −H(p) − Σ p·log q), row dot products without
    temporaries, and the gradient built in place. Memory stays a few [chunk × V] float32 blocks at a time."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, ref, lse_b, top_idx, top_lq, tail_q, kl, topk, chunk, softcap, scale
    ):  # type: ignore[override]
        n = hidden.shape[0]
        sparse = bool(kl) and top_idx.numel() > 0
        logp, ent, kls, htop, lse, lse_ref = (hidden.new_zeros(n, dtype=torch.float32) for _ in range(6))
        m = min(MODEL_TOP, top_idx.shape[1]) if sparse else 0
        m_idx = torch.zeros(n, m, dtype=torch.int32, device=hidden.device)  # the model's own top tokens
        m_lq = torch.zeros(n, m, dtype=torch.float32, device=hidden.device)  # the base's log-probs there
        lqt = torch.zeros(n if sparse else 0, dtype=torch.float32, device=hidden.device)  # log Q_tail
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, chunk):
                e = slice(s, s + chunk)
                z, _ = _chunk_logits(hidden[e], weight, bias, softcap, scale)
                if topk > 1:
                    top = torch.log_softmax(z.topk(topk, dim=-1).values, -1)
                    htop[e] = -(top.exp() * top).sum(-1) / math.log(topk)
                lse[e], u, tot = _logsumexp_exp(z)
                ls = z.sub_(lse[e, None])  # log p, in z's memory
                p = u.div_(tot[:, None])
                logp[e] = ls.gather(1, targets[e, None]).squeeze(1)
                ent[e] = -torch.linalg.vecdot(p, ls)
                if sparse:  # the outcomes: the base's k, the model's m not among them, the tail; lse_ref = log P_tail
                    ki, lqk = top_idx[e].long(), top_lq[e]
                    mi = ls.topk(m, dim=-1).indices
                    new = ~(mi[:, :, None] == ki[:, None, :]).any(-1)
                    lqm = _logits_at(ref[e], weight, bias, mi, softcap, scale) - lse_b[e, None]
                    m_idx[e], m_lq[e] = mi.to(torch.int32), lqm
                    lpk, lpm, w = ls.gather(1, ki), ls.gather(1, mi), new.float()
                    pk, pm, qk, qm = lpk.exp(), lpm.exp() * w, lqk.exp(), lqm.exp() * w
                    pt = _tail_mass(p, ki, mi)  # p is not read again
                    qt = (tail_q[e] - qm.sum(-1)).clamp_min(_TINY)
                    lse_ref[e], lqt[e] = lpt, lqt_e = pt.log(), qt.log()
                    if kl == 1:
                        kls[e] = (
                            torch.linalg.vecdot(pk, lpk - lqk) + torch.linalg.vecdot(pm, lpm - lqm) + pt * (lpt - lqt_e)
                        )
                    else:
                        kls[e] = (
                            torch.linalg.vecdot(qk, lqk - lpk) + torch.linalg.vecdot(qm, lqm - lpm) + qt * (lqt_e - lpt)
                        )
                elif kl:
                    zr, _ = _chunk_logits(ref[e], weight, bias, softcap, scale)
                    lse_ref[e], uq, tq = _logsumexp_exp(zr)
                    lq = zr.sub_(lse_ref[e, None])  # computed as log p is: equal states give a KL of exactly 0
                    if kl == 1:  # KL(p ‖ q) = −H(p) − Σ p·log q
                        kls[e] = -ent[e] - torch.linalg.vecdot(p, lq)
                    else:  # KL(q ‖ p) = Σ q·log q − Σ q·log p
                        q = uq.div_(tq[:, None])
                        kls[e] = torch.linalg.vecdot(q, lq) - torch.linalg.vecdot(q, ls)
        empty = torch.empty(0)
        ctx.save_for_backward(
            hidden,
            weight,
            bias if bias is not None else empty,
            targets,
            ref if kl else empty,
            top_idx if sparse else empty,
            top_lq if sparse else empty,
            m_idx,
            m_lq,
            lqt,
            lse,
            lse_ref,
            kls,
        )
        ctx.has_bias, ctx.kl, ctx.sparse, ctx.chunk, ctx.softcap, ctx.scale = (
            bias is not None,
            kl,
            sparse,
            chunk,
            softcap,
            scale,
        )
        ctx.mark_non_differentiable(ent, htop)
        return logp, ent, kls, htop

    @staticmethod
    def backward(ctx, g_logp, _g_ent, g_kl, _g_top):  # type: ignore[override]
        hidden, weight, bias, targets, ref, top_idx, top_lq, m_idx, m_lq, lqt, lse, lse_ref, kls = ctx.saved_tensors
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
                if use_kl and ctx.sparse:  # every token as a tail token, then the named outcomes written over
                    gk, kl_e = g_kl[e].float()[:, None], kls[e, None]
                    lpt, lqt_e = lse_ref[e, None], lqt[e, None]
                    named = [(m_idx[e].long(), m_lq[e]), (top_idx[e].long(), top_lq[e])]  # base's last: it wins ties
                    if ctx.kl == 1:  # tail: p·(gk·(log(P_t/Q_t) − KL) − g); named: p·(gk·(log(p/q) − KL) − g)
                        values = [
                            (lp.exp() * (gk * (lp - lq - kl_e) - g))
                            for lp, lq in ((ls.gather(1, i), q) for i, q in named)
                        ]
                        gz = p.mul_(gk * (lpt - lqt_e - kl_e) - g)
                    else:  # tail: p·(gk·(1 − Q_t/P_t) − g); named: p·(gk − g) − gk·q
                        values = [ls.gather(1, i).exp() * (gk - g) - gk * q.exp() for i, q in named]
                        gz = p.mul_(gk * (1 - (lqt_e - lpt).exp()) - g)
                    for (i, _), value in zip(named, values):
                        gz.scatter_(1, i, value)
                elif use_kl:
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
            *([None] * 11),
        )


KL_DIRECTIONS = {"reverse": 1, "forward": 2}  # KL(p_θ ‖ p_ref) (sft_kl) or KL(p_ref ‖ p_θ) (ASFT's code)


def head_outputs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    mask: Tensor,
    bias: Tensor | None = None,
    ref: Reference | None = None,
    kl: str | None = None,
    topk: int = 0,
    chunk: int = 1024,
    softcap: float | None = None,
    scale: float = 1.0,
) -> dict[str, Tensor]:
    """The fused head on a padded batch: `logp` (with gradient), `entropy`, and, when asked, `kl` (to the reference
    `ref` at the mask's positions in row-major order — the base's hidden states, or its top-k and tail mass — in
    direction `kl`, with gradient) and `topk_entropy` — each [B, L] float32, zero where `mask` is False."""
    flat = mask.nonzero(as_tuple=True)
    code = KL_DIRECTIONS[kl] if kl else 0
    if code and ref is None:
        raise ValueError("head_outputs: a KL needs a reference")
    empty = hidden.new_empty(0)
    sparse = code and ref.sparse
    parts = _FusedHead.apply(
        hidden[flat],
        weight,
        bias,
        targets[flat],
        ref.hidden if code else empty,
        ref.lse if sparse else empty,
        ref.top_idx if sparse else empty,
        ref.top_logq if sparse else empty,
        ref.tail_q if sparse else empty,
        code,
        topk,
        chunk,
        softcap,
        scale,
    )
    names = ("logp", "entropy", "kl", "topk_entropy")
    return {name: hidden.new_zeros(mask.shape, dtype=torch.float32).index_put(flat, v) for name, v in zip(names, parts)}
