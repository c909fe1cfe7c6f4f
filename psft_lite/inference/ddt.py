"""`psft-lite ddt`: the distribution-discriminant diagnostic of docs/METHODS.md §3.

Per trained (response) token under a model p at temperature 1: φ = log p(y_t | s_t) + H(p(·|s_t)). Text the model
would write itself averages φ ≈ 0; off-distribution text has φ < 0. Computed from the same chunked LM-head pass as
training (float32 entropy, no [T × V] tensor for a whole sequence).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from psft_lite.data.tokenize import Example
from psft_lite.model.scoring import score_examples

#: Histogram bin edges for φ (nats); the outer bins are open.
BINS = [-10.0, -5.0, -3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]
IN_DISTRIBUTION = -0.05  # the paper's rule of thumb: ≈ −0.05 is close to in-distribution,
OFF_DISTRIBUTION = -0.1  # < −0.1 is out-of-distribution


def token_phi(
    model: Any,
    examples: list[Example],
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """φ of every trained token, one 1-D float32 tensor per example (in order)."""
    out: list[torch.Tensor] = []
    for b, logp, ent in score_examples(model, examples, pad_id, device, dtype, batch_size):
        phi = (logp + ent).float().cpu()
        mask = b.target_mask.cpu()
        out += [phi[i][mask[i]] for i in range(len(b.index))]
        if progress:
            progress(len(b.index))
    return out


def summarize(per_example: list[torch.Tensor]) -> dict[str, Any]:
    """Mean φ (over tokens, and over sequences), shares above thresholds, a histogram and the verdict."""
    phi = torch.cat(per_example) if per_example else torch.zeros(0)
    n = phi.numel()
    if n == 0:
        return {"tokens": 0, "examples": 0}
    edges = [-float("inf"), *BINS, float("inf")]
    hist = [int(((phi >= lo) & (phi < hi)).sum()) for lo, hi in zip(edges[:-1], edges[1:])]
    mean = float(phi.mean())
    stats = {
        "examples": len(per_example),
        "tokens": n,
        "mean_phi": mean,
        "mean_phi_per_sequence": float(torch.stack([p.mean() for p in per_example if p.numel()]).mean()),
        "std_phi": float(phi.std()) if n > 1 else 0.0,
        "share_phi_gt_0": float((phi > 0).float().mean()),
        "share_phi_gt_-1": float((phi > -1).float().mean()),
        "share_phi_gt_-3": float((phi > -3).float().mean()),
        "share_phi_gt_-5": float((phi > -5).float().mean()),
        "histogram": {"edges": BINS, "counts": hist},
    }
    stats["verdict"] = verdict(mean)
    return stats


def verdict(mean_phi: float) -> str:
    if mean_phi >= IN_DISTRIBUTION:
        return "in-distribution: the model would write text like this itself; plain SFT (or psft) is fine"
    if mean_phi >= OFF_DISTRIBUTION:
        return "near the model's distribution: sft/psft are fine; idft damps the few off-distribution tokens"
    return (
        "off-distribution: the data is far from what the model writes; prefer psft, idft/dft, or rewrite the data "
        "with `psft-lite hint` (Hinted Decoding) before SFT"
    )


def report_lines(stats: dict[str, Any], model: str, data: str) -> list[str]:
    """What `psft-lite ddt` prints: mean φ, the shares above thresholds, a histogram and the verdict."""
    lines = [
        f"DDT of {data} under {model}: {stats['examples']} examples, {stats['tokens']:,} response tokens",
        f"  mean φ {stats['mean_phi']:+.4f}  (per sequence {stats['mean_phi_per_sequence']:+.4f}, std "
        f"{stats['std_phi']:.3f})",
        f"  share φ > 0: {stats['share_phi_gt_0']:.1%}   > −1: {stats['share_phi_gt_-1']:.1%}   > −3: "
        f"{stats['share_phi_gt_-3']:.1%}   > −5: {stats['share_phi_gt_-5']:.1%}",
    ]
    counts = stats["histogram"]["counts"]
    edges = ["−∞", *[f"{b:g}" for b in BINS], "∞"]
    top = max(counts) or 1
    for i, c in enumerate(counts):
        lines.append(f"  [{edges[i]:>4}, {edges[i + 1]:>4})  {'█' * round(30 * c / top):<30} {c}")
    return lines + [f"  verdict: {stats['verdict']}"]
