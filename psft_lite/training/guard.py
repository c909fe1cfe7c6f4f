"""Training-time guard rails: entropy watch, drift watch, loss watchdog (the `[guard]` recipe section).

Plain SFT collapses the model's entropy and drifts away from what it knew; these watches say so while it happens.
Each reads the per-step metrics record (no extra work, except the drift sample when psft `base` mode does not give
it for free) and returns events that go to metrics.jsonl as `{"event": ..., "step": ...}` lines. An event with
`stop` ends the run with a checkpoint.
"""

from __future__ import annotations

import math
from typing import Any

from psft_lite.recipe.schema import GuardSection

Event = dict[str, Any]

#: What to try, per warning and per method (objectives.method_name): only settings the running method reads, and
#: never the method itself.
_SFT_KL = "objective.kind = 'sft_kl' (the default: SFT with a KL penalty that holds it near the base model)"
_STUDY = "the run's general-ability verdict ([eval] final = true) says what it cost"

#: What the guard suggests per event and method: the knobs to turn, never a figure (a message cannot go stale); what
#: a run cost is its own verdict's to say.
ADVICE: dict[str, dict[str, str]] = {
    "entropy": {
        "sft": f"Options: fewer epochs or a lower train.lr, or {_SFT_KL}; {_STUDY}.",
        "dft": f"Options: fewer epochs or a lower train.lr, or {_SFT_KL}; {_STUDY}.",
        "idft": f"Options: fewer epochs or a lower train.lr, or {_SFT_KL}; {_STUDY}.",
        "psft-snapshot": "A larger objective.refresh_every or a tighter objective.clip_high bounds each refresh's "
        f"step, not the total; {_SFT_KL} bounds the total; {_STUDY}.",
        "psft-base": f"Options: a tighter objective.clip_high, or fewer epochs; {_STUDY}.",
        "sft_kl": f"Options: a larger objective.kl_coef, fewer epochs or a lower train.lr; {_STUDY}.",
        "asft": f"Options: a larger objective.asft_kl_coef, fewer epochs or a lower train.lr; {_STUDY}.",
    },
    "drift": {
        "sft": f"Options: fewer epochs or a lower train.lr, or {_SFT_KL}; {_STUDY}.",
        "dft": f"Options: fewer epochs or a lower train.lr, or {_SFT_KL}; {_STUDY}.",
        "idft": f"Options: fewer epochs or a lower train.lr, or {_SFT_KL}; {_STUDY}.",
        "psft-snapshot": f"Options: fewer epochs, or {_SFT_KL}; {_STUDY}.",
        "psft-base": f"Options: a tighter objective.clip_high, or a lower train.lr; {_STUDY}.",
        "sft_kl": f"Options: a larger objective.kl_coef, or a lower train.lr; {_STUDY}.",
        "asft": f"Options: a larger objective.asft_kl_coef, or a lower train.lr; {_STUDY}.",
    },
}
#: for a method with no row of its own (eaft, or an objective registered later)
DEFAULT_ADVICE = f"Options: fewer epochs or a lower train.lr, or {_SFT_KL}; {_STUDY}."


class Guard:
    def __init__(self, cfg: GuardSection, total_steps: int, method: str = "sft"):
        """`method`: the running method's name (objectives.method_name), which decides the advice."""
        self.cfg = cfg
        self.total = total_steps
        self.method = method
        self.baseline: float | None = None
        self.first: list[float] = []  # entropies of the first steps (≈ the base model: LoRA B starts at zero)
        self.entropy_ema: float | None = None
        self.ema_history: list[float] = []
        self.nll_ema: float | None = None
        self.drift_ema: float | None = None
        self.drift_step = 0
        self.bad = 0  # consecutive skipped steps
        self.fired: set[str] = set()

    # -- before the optimizer step ------------------------------------------------------------------------------------

    def check_step(self, rec: dict[str, Any]) -> str | None:
        """Why this step's update must be skipped (non-finite values, or an NLL spike), or None."""
        if not (math.isfinite(rec["loss"]) and math.isfinite(rec["grad_norm"]) and math.isfinite(rec.get("nll", 0.0))):
            return "non-finite loss or gradient"
        c, nll = self.cfg, rec.get("nll")
        if c.loss_spike_factor and nll is not None and self.nll_ema is not None and rec["step"] > c.warmup_steps:
            if nll > c.loss_spike_factor * self.nll_ema + c.loss_spike_margin:
                return f"loss spike: nll {nll:.3g} > {c.loss_spike_factor:g} × its running mean {self.nll_ema:.3g}"
        return None

    # -- after the step -----------------------------------------------------------------------------------------------

    def observe(self, rec: dict[str, Any], skipped: str | None) -> list[Event]:
        step, events = rec["step"], []
        if skipped:
            self.bad += 1
            stop = self.bad >= self.cfg.patience
            events.append(
                {
                    "event": "skipped_step",
                    "step": step,
                    "reason": skipped,
                    "stop": stop,
                    "message": (
                        f"step {step}: {skipped}; update skipped ({self.bad} in a row"
                        + (f", patience {self.cfg.patience} reached" if stop else "")
                        + ")."
                    ),
                }
            )
            return events
        self.bad = 0
        a = self.cfg.ema
        nll = rec.get("nll")
        if nll is not None:
            self.nll_ema = nll if self.nll_ema is None else a * self.nll_ema + (1 - a) * nll
        ent = rec.get("entropy")
        if ent is not None and self.cfg.entropy_watch:
            events += self._entropy(step, ent)
        drift = rec.get("drift")
        if drift is not None:
            # Smoothed like the entropy, per step elapsed (drift is sampled every step in psft base mode, every
            # guard.drift_every steps otherwise): one noisy batch above the threshold is not the model's state.
            if self.drift_ema is not None:
                w = a ** (step - self.drift_step)
                drift = w * self.drift_ema + (1 - w) * drift
            self.drift_ema, self.drift_step = drift, step
        if drift is not None and self.cfg.drift_watch and drift > self.cfg.drift_max and "drift" not in self.fired:
            self.fired.add("drift")
            events.append(
                {
                    "event": "drift_warning",
                    "step": step,
                    "drift": drift,
                    "stop": self.cfg.action == "stop",
                    "message": (
                        f"step {step}: the model has drifted from the base: on the training tokens it is "
                        f"e^{drift:.2f} = {math.exp(drift):.1f}× more likely than the base model on average "
                        f"(threshold guard.drift_max = {self.cfg.drift_max:g}). It is moving far from what it knew. "
                        f"{ADVICE['drift'].get(self.method, DEFAULT_ADVICE)}"
                    ),
                }
            )
        return events

    def _entropy(self, step: int, ent: float) -> list[Event]:
        c = self.cfg
        if self.baseline is None:
            self.first.append(ent)
            if len(self.first) >= c.baseline_steps:
                self.baseline = sum(self.first) / len(self.first)
                self.entropy_ema = self.baseline
            return []
        self.entropy_ema = c.ema * self.entropy_ema + (1 - c.ema) * ent
        self.ema_history.append(self.entropy_ema)
        if "entropy" in self.fired or self.baseline <= 0:
            return []
        floor = c.entropy_floor * self.baseline
        reason = None
        if self.entropy_ema < floor:
            reason = f"it fell to {self.entropy_ema / self.baseline:.0%} of its starting value"
        elif len(self.ema_history) >= c.trend_steps and step < self.total:
            # Log-linear (entropy falls by a factor, not an amount), and no further ahead than half the steps run
            # so far: extrapolating the first steep drop over the whole run warned every psft base run that then
            # levelled off at about a quarter of its start.
            window = self.ema_history[-c.trend_steps :]
            if min(window) > 0:
                slope = (math.log(window[-1]) - math.log(window[0])) / (len(window) - 1)
                horizon = min(self.total - step, step // 2)
                projected = self.entropy_ema * math.exp(slope * horizon)
                if slope < 0 and projected < c.collapse_fraction * self.baseline:
                    reason = (
                        f"at its current rate it would fall to {projected / self.baseline:.0%} of its starting "
                        f"value within {horizon} more steps"
                    )
        if reason is None:
            return []
        self.fired.add("entropy")
        return [
            {
                "event": "entropy_warning",
                "step": step,
                "entropy_ema": self.entropy_ema,
                "baseline": self.baseline,
                "stop": c.action == "stop",
                "message": (
                    f"step {step}: entropy on the trained tokens is collapsing — {reason} ({self.entropy_ema:.3f} vs "
                    f"{self.baseline:.3f}). The model is becoming certain of exactly the training text. "
                    f"{ADVICE['entropy'].get(self.method, DEFAULT_ADVICE)}"
                ),
            }
        ]

    # -- resume -------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "first": self.first,
            "entropy_ema": self.entropy_ema,
            "ema_history": self.ema_history[-self.cfg.trend_steps :],
            "nll_ema": self.nll_ema,
            "drift_ema": self.drift_ema,
            "drift_step": self.drift_step,
            "bad": self.bad,
            "fired": sorted(self.fired),
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.baseline, self.first, self.entropy_ema = s.get("baseline"), list(s.get("first", [])), s.get("entropy_ema")
        self.ema_history, self.nll_ema = list(s.get("ema_history", [])), s.get("nll_ema")
        self.drift_ema, self.drift_step = s.get("drift_ema"), int(s.get("drift_step", 0))
        self.bad, self.fired = int(s.get("bad", 0)), set(s.get("fired", []))
