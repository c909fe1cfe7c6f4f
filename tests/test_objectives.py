"""Objectives against METHODS.md: the reference vectors (float64) and hand-checkable identities."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from psft_lite.model.logprobs import logprobs_from_logits, target_logprobs
from psft_lite.training.losses import dft_loss, idft_loss, psft_loss, sft_loss, token_weights

REF = json.loads((Path(__file__).parent / "data" / "objectives_reference.json").read_text())
PSFT_DEFAULTS = {"clip_high": 0.28, "clip_low": 0.2}  # METHODS.md §2
IDFT_DEFAULTS = {"beta": 1.0, "gamma_min": 0.1, "gamma_max": 2.0}  # METHODS.md §4
ATOL = 1e-12  # float64 on a 2×5×7 problem: errors are ~1e-16; 1e-12 still fails on any formula slip


def _inputs():
    logits = torch.tensor(REF["logits"], dtype=torch.float64, requires_grad=True)
    targets = torch.tensor(REF["targets"])
    mask = torch.tensor(REF["mask"], dtype=torch.float64).bool()
    logp, ent = logprobs_from_logits(logits, targets)
    return logits, targets, mask, logp, ent


def _check(name, loss, logits, stats=None):
    ref = REF[name]
    (grad,) = torch.autograd.grad(loss, logits)
    assert abs(loss.item() - ref["loss"]) < ATOL
    torch.testing.assert_close(grad, torch.tensor(ref["grad_logits"], dtype=torch.float64), atol=ATOL, rtol=0)


def test_per_token_quantities_match_reference():
    _, _, mask, logp, ent = _inputs()
    m = mask.double()
    torch.testing.assert_close(logp.detach() * m, torch.tensor(REF["logp"], dtype=torch.float64) * m, atol=ATOL, rtol=0)
    torch.testing.assert_close(ent * m, torch.tensor(REF["entropy"], dtype=torch.float64) * m, atol=ATOL, rtol=0)
    torch.testing.assert_close(
        (logp.detach() + ent) * m, torch.tensor(REF["phi"], dtype=torch.float64) * m, atol=ATOL, rtol=0
    )


def test_sft_token_and_sequence_mean():
    logits, _, mask, logp, _ = _inputs()
    loss, _ = sft_loss(logp, mask=mask, weights=token_weights(mask, "token", dtype=torch.float64))
    _check("sft", loss, logits)
    logits, _, mask, logp, _ = _inputs()
    loss, _ = sft_loss(logp, mask=mask, weights=token_weights(mask, "sequence", dtype=torch.float64))
    _check("sft_seqmean", loss, logits)


def test_dft():
    logits, _, mask, logp, _ = _inputs()
    loss, _ = dft_loss(logp, mask=mask, weights=token_weights(mask, "token", dtype=torch.float64))
    _check("dft", loss, logits)


@pytest.mark.parametrize("name,lam", [("idft", 1.0), ("idft_lambda0", 0.0)])
def test_idft(name, lam):
    logits, _, mask, logp, ent = _inputs()
    loss, stats = idft_loss(
        logp,
        entropy=ent,
        mask=mask,
        weights=token_weights(mask, "token", dtype=torch.float64),
        beta=1,
        gamma_min=0.1,
        gamma_max=2,
        lam=lam,
    )
    _check(name, loss, logits)
    m = mask.double()
    gamma_ref = torch.tensor(REF[name]["gamma"], dtype=torch.float64)
    assert abs(stats["gamma_mean"].item() - ((gamma_ref * m).sum() / m.sum()).item()) < ATOL


def test_idft_lambda0_is_dft_and_weight_is_detached():
    logits, _, mask, logp, ent = _inputs()
    w = token_weights(mask, "token", dtype=torch.float64)
    a, _ = idft_loss(logp, entropy=ent, mask=mask, weights=w, **IDFT_DEFAULTS, lam=0.0)
    b, _ = dft_loss(logp, mask=mask, weights=w)
    ga = torch.autograd.grad(a, logits, retain_graph=True)[0]
    gb = torch.autograd.grad(b, logits)[0]
    assert abs(a.item() - b.item()) < ATOL
    torch.testing.assert_close(ga, gb, atol=ATOL, rtol=0)
    # With the weight detached, d loss / d logp_t = −w_t · p_t^γ exactly (no d(p^γ)/d logp term).
    lp = logp.detach().clone().requires_grad_(True)
    loss, _ = idft_loss(lp, entropy=ent, mask=mask, weights=w, **IDFT_DEFAULTS, lam=1.0)
    (g,) = torch.autograd.grad(loss, lp)
    gamma = torch.tensor(REF["idft"]["gamma"], dtype=torch.float64)
    torch.testing.assert_close(g, -w * torch.exp(gamma * logp.detach()), atol=ATOL, rtol=0)


def test_psft_matches_reference_and_zero_grad_where_clipped():
    logits, _, mask, logp, _ = _inputs()
    old = torch.tensor(REF["old_logp"], dtype=torch.float64)
    loss, stats = psft_loss(
        logp, old_logp=old, mask=mask, weights=token_weights(mask, "token", dtype=torch.float64), **PSFT_DEFAULTS
    )
    _check("psft", loss, logits)
    assert abs(stats["clip_frac"].item() - REF["psft"]["clip_frac"]) < ATOL
    ratio = torch.tensor(REF["psft"]["ratio"], dtype=torch.float64)
    # gradient w.r.t. each token's log-prob: −w·r below 1+ε_high, exactly 0 above
    lp = logp.detach().clone().requires_grad_(True)
    w = token_weights(mask, "token", dtype=torch.float64)
    loss, _ = psft_loss(lp, old_logp=old, mask=mask, weights=w, **PSFT_DEFAULTS)
    (g,) = torch.autograd.grad(loss, lp)
    clipped = ratio > 1.28
    assert clipped[mask].any() and (~clipped[mask]).any()
    assert torch.all(g[clipped] == 0)
    torch.testing.assert_close(g[~clipped], (-w * ratio)[~clipped], atol=ATOL, rtol=0)


def test_psft_at_ratio_one_is_sft_gradient():
    logits, _, mask, logp, _ = _inputs()
    w = token_weights(mask, "token", dtype=torch.float64)
    a, stats = psft_loss(logp, old_logp=logp.detach(), mask=mask, weights=w, **PSFT_DEFAULTS)
    ga = torch.autograd.grad(a, logits, retain_graph=True)[0]
    b, _ = sft_loss(logp, mask=mask, weights=w)
    gb = torch.autograd.grad(b, logits)[0]
    torch.testing.assert_close(ga, gb, atol=ATOL, rtol=0)
    assert stats["clip_frac"].item() == 0 and stats["ratio_mean"].item() == 1.0


def test_decreases_are_never_clipped():
    # r = e^-1 < 1 − ε_low: the gradient still flows (A > 0 makes ε_low inert)
    lp = torch.tensor([[-3.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-2.0]], dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss, _ = psft_loss(
        lp, old_logp=old, mask=mask, weights=token_weights(mask, "token", dtype=torch.float64), **PSFT_DEFAULTS
    )
    (g,) = torch.autograd.grad(loss, lp)
    assert abs(g.item() + math.exp(-1.0)) < 1e-12


@pytest.mark.parametrize("normalize", ["token", "sequence"])
def test_normalisation_exact_under_accumulation(normalize):
    torch.manual_seed(0)
    logits = torch.randn(6, 9, 11, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (6, 9))
    mask = torch.rand(6, 9) < 0.6
    mask[:, 0] = True
    logp, _ = logprobs_from_logits(logits, targets)
    whole, _ = sft_loss(logp, mask=mask, weights=token_weights(mask, normalize, dtype=torch.float64))
    g_whole = torch.autograd.grad(whole, logits)[0]
    # the same step as three micro-batches of 2, weights computed against the whole step's counts
    n_tok, n_seq = int(mask.sum()), int((mask.sum(-1) > 0).sum())
    total, g_acc = 0.0, torch.zeros_like(logits)
    for k in range(0, 6, 2):
        lg = logits.detach()[k : k + 2].clone().requires_grad_(True)
        lp, _ = logprobs_from_logits(lg, targets[k : k + 2])
        part, _ = sft_loss(
            lp,
            mask=mask[k : k + 2],
            weights=token_weights(mask[k : k + 2], normalize, n_tok, n_seq, dtype=torch.float64),
        )
        part.backward()
        total += part.item()
        g_acc[k : k + 2] = lg.grad
    assert abs(total - whole.item()) < 1e-12
    torch.testing.assert_close(g_acc, g_whole, atol=1e-12, rtol=0)
    if normalize == "sequence":  # and it is not the token mean when lengths differ
        tok, _ = sft_loss(logp.detach(), mask=mask, weights=token_weights(mask, "token", dtype=torch.float64))
        assert abs(tok.item() - whole.item()) > 1e-6


def test_uniform_logits_give_phi_zero():
    logits = torch.zeros(1, 4, 13, dtype=torch.float64)
    logp, ent = logprobs_from_logits(logits, torch.randint(0, 13, (1, 4)))
    torch.testing.assert_close(logp + ent, torch.zeros(1, 4, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("softcap,scale,bias", [(None, 1.0, False), (30.0, 1.0, False), (None, 0.5, True)])
def test_chunked_head_matches_naive_path_with_gradients(softcap, scale, bias):
    torch.manual_seed(0)
    B, L, H, V = 3, 7, 16, 50
    hidden = torch.randn(B, L, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True) if bias else None
    targets = torch.randint(0, V, (B, L))
    mask = torch.rand(B, L) < 0.5
    mask[0, 0] = True
    upstream = torch.randn(B, L, dtype=torch.float64)

    logp, ent = target_logprobs(hidden, weight, targets, mask, bias=b, chunk=4, softcap=softcap, scale=scale)
    params = [hidden, weight] + ([b] if bias else [])
    g_chunk = torch.autograd.grad((logp * upstream).sum(), params)

    z = hidden @ weight.t() + (b if bias else 0)
    z = z * scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    ref_logp, ref_ent = logprobs_from_logits(z, targets)
    ref_logp = ref_logp * mask
    g_ref = torch.autograd.grad((ref_logp * upstream).sum(), params)

    torch.testing.assert_close(logp.double(), ref_logp.detach(), atol=1e-5, rtol=0)  # logits are float32 inside
    torch.testing.assert_close(ent.double(), (ref_ent * mask), atol=1e-5, rtol=0)
    for a, r in zip(g_chunk, g_ref):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)
    assert not ent.requires_grad


def _direct_kl(z: torch.Tensor, z_ref: torch.Tensor) -> torch.Tensor:
    """KL(softmax(z) ‖ softmax(z_ref)) per row, written out from the definition (the reference)."""
    p = torch.softmax(z, -1)
    return (p * (torch.log(p) - torch.log(torch.softmax(z_ref, -1)))).sum(-1)


def test_sft_kl_matches_its_definition_in_float64():
    """ℓ = Σ_t w_t (−log p_t + β·KL_t): loss and gradient w.r.t. the logits against autograd on the definition."""
    from psft_lite.training.losses import sft_kl_loss

    logits, targets, mask, logp, _ = _inputs()
    base = torch.roll(logits.detach(), 1, dims=-1) * 0.7  # a different, fixed distribution at every position
    kl = _direct_kl(logits, base)
    w = token_weights(mask, "token", dtype=torch.float64)
    loss, stats = sft_kl_loss(logp, mask=mask, weights=w, kl_base=kl, kl_coef=0.3)
    (grad,) = torch.autograd.grad(loss, logits)

    ref_logits = logits.detach().clone().requires_grad_(True)
    ls = torch.log_softmax(ref_logits, -1)
    p = ls.exp()
    ref_kl = (p * (ls - torch.log_softmax(base, -1))).sum(-1)
    ref_loss = (w * (-ls.gather(-1, targets[..., None]).squeeze(-1) + 0.3 * ref_kl)).sum()
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_logits)
    assert abs(loss.item() - ref_loss.item()) < ATOL
    torch.testing.assert_close(grad, ref_grad, atol=ATOL, rtol=0)
    m = mask.double()
    assert abs(stats["kl_base"].item() - ((ref_kl * m).sum() / m.sum()).item()) < ATOL and stats["kl_base"] > 0
    # at the base itself the penalty and its gradient vanish: sft_kl is exactly sft
    logits, _, mask, logp, _ = _inputs()
    same, _ = sft_kl_loss(logp, mask=mask, weights=w, kl_base=_direct_kl(logits, logits.detach()), kl_coef=0.3)
    (g_same,) = torch.autograd.grad(same, logits, retain_graph=True)
    (g_sft,) = torch.autograd.grad(sft_loss(logp, mask=mask, weights=w)[0], logits)
    torch.testing.assert_close(g_same, g_sft, atol=ATOL, rtol=0)


def test_the_heads_logsumexp_keeps_its_exponentials_and_is_torchs_bit_for_bit():
    """The head computes logsumexp once and reuses its exponentials for p (one vocabulary-wide exp, not two); its
    value must be torch's own bit for bit, so that the base's cached top-k and the model's log-probs agree exactly
    at equal states (a KL of 0 at a run's first step)."""
    from psft_lite.model.logprobs import _logsumexp_exp

    torch.manual_seed(0)
    z = torch.randn(5, 1000) * 6
    z[0, :3] = -math.inf  # masked tokens, as some heads have
    lse, u, s = _logsumexp_exp(z.clone())
    assert torch.equal(lse, torch.logsumexp(z, -1))
    torch.testing.assert_close(u / s[:, None], torch.softmax(z, -1), rtol=1e-6, atol=1e-9)
    w = z.clone()
    lse2, u2, _ = _logsumexp_exp(w, inplace=True)
    assert torch.equal(lse2, lse) and u2.data_ptr() == w.data_ptr()  # in place: no second [N, V] block


def test_chunked_kl_to_reference_equals_the_full_computation_with_gradient():
    from psft_lite.model.logprobs import kl_to_reference

    torch.manual_seed(0)
    h = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    h_ref = torch.randn(11, 6, dtype=torch.float64)
    w = torch.randn(9, 6, dtype=torch.float64)
    got = kl_to_reference(h, h_ref, w, chunk=4)  # three chunks, the last one short
    (g_got,) = torch.autograd.grad(got.sum(), h)
    want = _direct_kl(h @ w.t(), h_ref @ w.t())
    (g_want,) = torch.autograd.grad(want.sum(), h)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)  # the head runs in float32
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-5)
    assert (got >= -1e-6).all()


def _topk_entropy(z: torch.Tensor, k: int) -> torch.Tensor:
    """H(softmax(top-k of z)) / ln k, from the definition."""
    top = torch.softmax(z.topk(k, -1).values, -1)
    return -(top * torch.log(top)).sum(-1) / math.log(k)


def test_asft_matches_its_definition_in_float64():
    """ASFT: ℓ = Σ_t w_t (−sg[p_t]·log p_t + λ·KL(p_base ‖ p)) — the forward KL, as the paper's code computes it."""
    from psft_lite.training.losses import asft_loss

    logits, targets, mask, logp, _ = _inputs()
    base = torch.roll(logits.detach(), 2, dims=-1) * 0.5
    kl = _direct_kl(base, logits)  # KL(p_base ‖ p_θ): the reference first
    w = token_weights(mask, "token", dtype=torch.float64)
    loss, stats = asft_loss(logp, mask=mask, weights=w, kl_base=kl, asft_kl_coef=0.05)
    (grad,) = torch.autograd.grad(loss, logits)
    z = logits.detach().clone().requires_grad_(True)
    ls = torch.log_softmax(z, -1)
    lp = ls.gather(-1, targets[..., None]).squeeze(-1)
    lb = torch.log_softmax(base, -1)
    ref_kl = (lb.exp() * (lb - ls)).sum(-1)
    ref_loss = (w * (-lp.detach().exp() * lp + 0.05 * ref_kl)).sum()
    (ref_grad,) = torch.autograd.grad(ref_loss, z)
    assert abs(loss.item() - ref_loss.item()) < ATOL
    torch.testing.assert_close(grad, ref_grad, atol=ATOL, rtol=0)
    m = mask.double()
    assert abs(stats["kl_base"].item() - ((ref_kl * m).sum() / m.sum()).item()) < ATOL


def test_eaft_matches_its_definition_in_float64():
    """EAFT: ℓ = Σ_t w_t · sg[(H_topk,t / ln k)^α] · (−log p_t): a confident token (low top-k entropy) is damped."""
    from psft_lite.training.losses import eaft_loss

    logits, targets, mask, logp, _ = _inputs()
    h = _topk_entropy(logits.detach(), 3)
    w = token_weights(mask, "token", dtype=torch.float64)
    loss, stats = eaft_loss(logp, mask=mask, weights=w, topk_entropy=h, eaft_alpha=1.5)
    (grad,) = torch.autograd.grad(loss, logits)
    z = logits.detach().clone().requires_grad_(True)
    lp = torch.log_softmax(z, -1).gather(-1, targets[..., None]).squeeze(-1)
    weight = -(
        torch.softmax(z.detach().topk(3, -1).values, -1) * torch.log_softmax(z.detach().topk(3, -1).values, -1)
    ).sum(-1) / math.log(3)
    ref_loss = (w * weight**1.5 * -lp).sum()
    (ref_grad,) = torch.autograd.grad(ref_loss, z)
    assert abs(loss.item() - ref_loss.item()) < ATOL
    torch.testing.assert_close(grad, ref_grad, atol=ATOL, rtol=0)
    assert 0 < stats["eaft_weight"].item() <= 1


@pytest.mark.parametrize("kl", [None, "reverse", "forward"])
@pytest.mark.parametrize("softcap,scale,bias", [(None, 1.0, False), (5.0, 0.7, True)])
def test_the_fused_head_equals_the_full_computation_with_gradients(kl, softcap, scale, bias):
    """One pass gives log p(target), entropy, the KL to a reference in either direction and the top-k entropy, and
    the gradients of log p and the KL through the hidden states and the head, as full float logits give them."""
    from psft_lite.model.logprobs import Reference, head_outputs

    torch.manual_seed(0)
    b, length, hid, vocab = 2, 7, 6, 11
    h = torch.randn(b, length, hid, dtype=torch.float64, requires_grad=True)
    h_ref = torch.randn(b, length, hid, dtype=torch.float64)
    w = torch.randn(vocab, hid, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(vocab, dtype=torch.float64, requires_grad=True) if bias else None
    targets = torch.randint(0, vocab, (b, length))
    mask = torch.rand(b, length) > 0.3
    ref = Reference(hidden=h_ref[mask]) if kl else None
    out = head_outputs(h, w, targets, mask, bb, ref, kl, topk=4, chunk=3, softcap=softcap, scale=scale)

    def logits(x):
        z = x @ w.t() + (bb if bias else 0)
        z = z * scale
        return softcap * torch.tanh(z / softcap) if softcap else z

    z, zr = logits(h)[mask], logits(h_ref)[mask].detach()
    ls, lr = torch.log_softmax(z, -1), torch.log_softmax(zr, -1)
    want = {
        "logp": ls.gather(-1, targets[mask][:, None]).squeeze(-1),
        "entropy": -(ls.exp() * ls).sum(-1),
        "topk_entropy": _topk_entropy(z.detach(), 4),
    }
    if kl:
        want["kl"] = (ls.exp() * (ls - lr)).sum(-1) if kl == "reverse" else (lr.exp() * (lr - ls)).sum(-1)
    for name, value in want.items():
        torch.testing.assert_close(out[name][mask].double(), value.detach(), rtol=1e-5, atol=1e-5)  # head in fp32
        assert (out[name][~mask] == 0).all()
    params = [h, w] + ([bb] if bias else [])
    got_loss = (out["logp"] * 0.3).sum() + (out["kl"].sum() * 0.7 if kl else 0)
    want_loss = (want["logp"] * 0.3).sum() + (want["kl"].sum() * 0.7 if kl else 0)
    for g, r in zip(torch.autograd.grad(got_loss, params), torch.autograd.grad(want_loss, params)):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5)


def _coarse_kl(ls: torch.Tensor, lr: torch.Tensor, k: int, kl: str, targets: torch.Tensor) -> torch.Tensor:
    """The KL over the base's top k tokens (the target in place of the k-th when it is not among them), the model's
    own top min(16, k), and one bucket for the rest, from full log-probs (the definition)."""
    top = lr.topk(k, -1).indices
    missing = ~(top == targets[:, None]).any(-1)
    top[missing, -1] = targets[missing]
    named = torch.zeros_like(ls, dtype=torch.bool).scatter(1, top, True)
    named.scatter_(1, ls.detach().topk(min(16, k), -1).indices, True)
    tiny = math.log(torch.finfo(torch.float32).tiny)  # an empty tail (k = V) counts as mass 'tiny'
    lp_t = torch.logsumexp(ls.masked_fill(named, -math.inf), -1).clamp_min(tiny)
    lq_t = torch.logsumexp(lr.masked_fill(named, -math.inf), -1).clamp_min(tiny)
    m = named.to(ls.dtype)
    if kl == "reverse":
        return (m * ls.exp() * (ls - lr)).sum(-1) + lp_t.exp() * (lp_t - lq_t)
    return (m * lr.exp() * (lr - ls)).sum(-1) + lq_t.exp() * (lq_t - lp_t)


@pytest.mark.parametrize("kl", ["reverse", "forward"])
@pytest.mark.parametrize("k", [3, 8, 11])
def test_the_top_k_reference_gives_the_coarse_kl_and_its_gradient_and_the_full_kl_when_k_is_the_vocabulary(kl, k):
    """With the base reduced to its top k tokens and a tail bucket (objective.reference_top_k), the fused head's KL
    and its gradients equal the KL over those k + 1 outcomes written out in float64, for both directions; with
    k = V it is the full KL; a model equal to the base gets a KL of 0."""
    from psft_lite.model.logprobs import Reference, head_outputs, reference_topk

    torch.manual_seed(1)
    b, length, hid, vocab = 2, 7, 6, 11
    h = torch.randn(b, length, hid, dtype=torch.float64, requires_grad=True)
    h_ref = h.detach() + 0.5 * torch.randn(b, length, hid, dtype=torch.float64)
    w = torch.randn(vocab, hid, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, vocab, (b, length))
    mask = torch.rand(b, length) > 0.3
    ref = reference_topk(h_ref[mask], w.detach(), k, chunk=4, targets=targets[mask])
    assert ref.sparse and ref.top_idx.shape == (int(mask.sum()), k) and ref.top_idx.dtype == torch.int32
    out = head_outputs(h, w, targets, mask, None, ref, kl, chunk=3)
    ls, lr = torch.log_softmax(h[mask] @ w.t(), -1), torch.log_softmax(h_ref[mask] @ w.detach().t(), -1)
    want = _coarse_kl(ls, lr, k, kl, targets[mask])
    assert (ref.top_idx.long() == targets[mask][:, None]).any(-1).all()  # the trained token is always kept
    atol = 1e-4 if k == vocab else 1e-6  # an empty tail: 1 − Σ p over the whole vocabulary is float32 rounding
    torch.testing.assert_close(out["kl"][mask].double(), want.detach(), rtol=1e-5, atol=atol)
    if k == vocab:
        full = (ls.exp() * (ls - lr)).sum(-1) if kl == "reverse" else (lr.exp() * (lr - ls)).sum(-1)
        torch.testing.assert_close(out["kl"][mask].double(), full.detach(), rtol=1e-5, atol=atol)
    else:
        full = (ls.exp() * (ls - lr)).sum(-1) if kl == "reverse" else (lr.exp() * (lr - ls)).sum(-1)
        assert (out["kl"][mask].double() <= full.detach() + 1e-6).all()  # the coarse KL is a lower bound
    lp = ls.gather(-1, targets[mask][:, None]).squeeze(-1)
    got_loss = (out["logp"] * 0.3).sum() + out["kl"].sum() * 0.7
    want_loss = (lp * 0.3).sum() + want.sum() * 0.7
    for g, r in zip(torch.autograd.grad(got_loss, [h, w]), torch.autograd.grad(want_loss, [h, w])):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5 if k < vocab else 1e-3)
    same = head_outputs(
        h.detach().float(),
        w.detach().float(),
        targets,
        mask,
        None,
        reference_topk(h.detach().float()[mask], w.detach().float(), k, targets=targets[mask]),
        kl,
    )
    # equal states: 0 up to the rounding of the few log q taken by dot product (exactly 0 once k > 16, when the
    # model's own top 16 are among the base's k, as at the first step of a run)
    assert (same["kl"].abs() < 1e-6).all()
    assert isinstance(Reference.cat(ref.split([2, len(ref) - 2])).top_logq, torch.Tensor)
