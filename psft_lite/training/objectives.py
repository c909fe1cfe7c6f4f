"""The table of training objectives: everything the rest of psft-lite knows about each one (docs/METHODS.md). The
recipe's `objective.kind` choices, the training step's dispatch and cross-rank statistics, the ignored-keys warning,
the guard, the plot panels and the study's methods all read it, so adding an objective is a loss function and one
row — `register` (or `psft_lite.register_objective`) adds one from outside.

This module imports no torch: a row names its loss as "module:function" and the function is imported when a run
first uses it (`Objective.fn`), so loading or validating a recipe stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from psft_lite.core.lazy import check_name, resolve

#: what a loss may read besides logp / mask / weights, and who provides it (training/step.py)
INPUTS = {"entropy", "old_logp", "lam", "kl_base", "topk_entropy"}


# ---------------------------------------------------------------------------------------------------------------------
# The table: everything the rest of psft-lite knows about an objective. The recipe's `objective.kind` choices, the
# loop's dispatch and cross-rank statistics, the ignored-keys warning, the plot panels and the study's methods all read
# it, so adding an objective is a loss function and one row here.


@dataclass(frozen=True)
class Objective:
    loss: str | Callable[..., Any]  # "module:function" (built-in rows: imported on first use) or the function
    label: str  # what it optimises, one line
    inputs: tuple[str, ...] = ()  # per-step inputs besides logp/mask/weights: "entropy", "old_logp", "lam", "kl_base",
    # "topk_entropy"
    kl: str | None = None  # with "kl_base": its direction, "reverse" KL(p_θ ‖ p_base) or "forward" KL(p_base ‖ p_θ)
    topk_key: str | None = None  # with "topk_entropy": the objective.* key that holds k
    params: tuple[str, ...] = ()  # objective.* recipe keys passed to the loss by keyword
    keys: tuple[str, ...] = ()  # every objective.* key it reads (params, schedule, old policy); others are ignored
    stats: tuple[str, ...] = ()  # token-mean statistics its loss returns (metrics.jsonl keys)
    max_stats: tuple[str, ...] = ()  # statistics combined by max (across micro-batches and ranks)
    panels: tuple[tuple[str, str], ...] = ()  # (metrics key, title) drawn by `psft-lite plot`
    variants: tuple[tuple[str, dict[str, Any], tuple[str, ...]], ...] = ()  # (method name, settings, keys it ignores)

    @property
    def uses_old_policy(self) -> bool:
        return "old_logp" in self.inputs

    @property
    def fn(self) -> Callable[..., Any]:
        """The loss function itself."""
        return resolve(self.loss)


_PSFT_PARAMS = ("clip_high", "clip_low")
_IDFT_PARAMS = ("beta", "gamma_min", "gamma_max")

_L = "psft_lite.training.losses:"

OBJECTIVES: dict[str, Objective] = {
    "sft": Objective(_L + "sft_loss", "−log p"),
    "sft_kl": Objective(
        _L + "sft_kl_loss",
        "−log p + β·KL(p ‖ p_base)",
        inputs=("kl_base",),
        kl="reverse",
        params=("kl_coef",),
        keys=("kl_coef", "reference_top_k", "reference_cache_mb"),
        stats=("kl_base",),
        panels=(("kl_base", "sft_kl: KL to base (full vocabulary)"),),
    ),
    "dft": Objective(_L + "dft_loss", "−sg[p]·log p"),
    "asft": Objective(
        _L + "asft_loss",
        "−sg[p]·log p + λ·KL(p_base ‖ p)",
        inputs=("kl_base",),
        kl="forward",
        params=("asft_kl_coef",),
        keys=("asft_kl_coef", "reference_top_k", "reference_cache_mb"),
        stats=("kl_base",),
        panels=(("kl_base", "asft: forward KL to base"),),
    ),
    "eaft": Objective(
        _L + "eaft_loss",
        "−sg[H̃_topk^α]·log p",
        inputs=("topk_entropy",),
        topk_key="eaft_top_k",
        params=("eaft_alpha",),
        keys=("eaft_alpha", "eaft_top_k"),
        stats=("eaft_weight",),
        panels=(("eaft_weight", "eaft: mean token weight"),),
    ),
    "psft": Objective(
        _L + "psft_loss",
        "−min(r, 1+ε_high), r = p / p_old",
        inputs=("old_logp",),
        params=_PSFT_PARAMS,
        keys=("old_policy", "refresh_every", *_PSFT_PARAMS, "sft_warmup_steps"),
        stats=("clip_frac", "ratio_mean", "approx_kl"),
        max_stats=("ratio_max",),
        panels=(("clip_frac", "psft clip fraction"), ("approx_kl", "approx. KL to old policy")),
        variants=(
            ("psft-snapshot", {"old_policy": "snapshot"}, ()),
            ("psft-base", {"old_policy": "base"}, ("refresh_every",)),  # the base never refreshes
        ),
    ),
    "idft": Objective(
        _L + "idft_loss",
        "−sg[p^γ]·log p, γ from φ = log p + H",
        inputs=("entropy", "lam"),
        params=_IDFT_PARAMS,
        keys=(*_IDFT_PARAMS, "lambda_warmup", "lambda_transition"),
        stats=("phi_mean", "phi_std", "gamma_mean", "weight_mean"),
        panels=(("phi_mean", "idft mean φ"),),
    ),
}


def methods() -> dict[str, dict[str, Any]]:
    """Every named method (an objective, or one of its variants) → its objective.* settings, in table order."""
    out: dict[str, dict[str, Any]] = {}
    for kind, spec in OBJECTIVES.items():
        for name, overrides, _ in spec.variants or ((kind, {}, ()),):
            out[name] = {"kind": kind, **overrides}
    return out


def method_keys(name: str) -> set[str]:
    """The objective.* keys a named method reads (a study sweeps a key only for the methods that read it)."""
    kind = methods()[name]["kind"]
    spec = OBJECTIVES[kind]
    ignored = next((ign for n, _, ign in spec.variants if n == name), ())
    return {"kind", "normalize", *spec.keys} - set(ignored)


def method_name(objective: Any) -> str:
    """The method an `ObjectiveSection` runs, e.g. `psft-base`."""
    for name, settings in methods().items():
        if all(getattr(objective, k) == v for k, v in settings.items()):
            return name
    return objective.kind


def register(name: str, loss: Callable[..., Any], **row: Any) -> Objective:
    """Add (or replace) an objective in the table, checked as a built-in row is: a name the recipe can hold, a
    callable loss, inputs the training step provides, statistics it reports; returns the row. The recipe reads the
    table when it validates, so `objective.kind = "<name>"` works from then on."""
    check_name("objective", name)
    if not callable(loss):
        raise ValueError(f"objective {name!r}: loss must be a function (logp, *, mask, weights, ...) -> (loss, stats)")
    row.setdefault("label", name)
    unknown = set(row.get("inputs", ())) - INPUTS
    if unknown:
        raise ValueError(f"objective {name!r}: unknown inputs {sorted(unknown)}; the step provides {sorted(INPUTS)}")
    if "kl_base" in row.get("inputs", ()) and row.get("kl") not in ("reverse", "forward"):
        raise ValueError(
            f"objective {name!r}: an objective reading kl_base says its direction, kl='reverse' or 'forward'"
        )
    _check_signature(name, loss, ["mask", "weights", *row.get("inputs", ()), *row.get("params", ())])
    try:
        spec = Objective(loss, **row)
    except TypeError as e:
        raise ValueError(f"objective {name!r}: {e}") from None
    OBJECTIVES[name] = spec
    return spec


def _check_signature(name: str, loss: Callable[..., Any], wanted: list[str]) -> None:
    """The loss takes every keyword the step will pass it (or **kwargs)."""
    import inspect

    try:
        accepted = inspect.signature(loss).parameters
    except (TypeError, ValueError):  # a builtin or C function: nothing to check
        return
    if any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        return
    missing = [k for k in wanted if k not in accepted]
    if missing:
        raise ValueError(
            f"objective {name!r}: its loss does not take {missing[0]}; it is called as loss(logp, *, "
            f"{', '.join(wanted)})"
        )
