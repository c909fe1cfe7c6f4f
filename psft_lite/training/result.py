"""What a training run returns: a typed record of where its files are, how long it took and what it did to the model
(`psft_lite.train` and `psft-lite train` both read it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainResult:
    run_dir: Path
    adapter: Path
    metrics_file: Path
    steps: int  # optimizer steps this call trained (all of them, or those after a resume)
    train_seconds: float
    seconds: float  # the whole call: loading, training, saving, final evaluation and outputs
    peak_memory_mb: float
    first: dict[str, Any] | None = None  # the first and last metrics records of this call
    last: dict[str, Any] | None = None
    final_nll: float | None = None
    entropy_start: float | None = None  # the entropy on trained tokens over the first and last steps of the run
    entropy_end: float | None = None
    entropy_kept: float | None = None
    drift: float | None = None  # the last measured drift from the base (nats), and its step
    drift_step: int | None = None
    final_eval: dict[str, Any] | None = None  # `eval.final`: per set before → after, the general-ability verdict
    gate: str | None = None  # `eval.max_forgetting`: why the run failed the gate, or None
    merged: Path | None = None
    gguf: list[Path] = field(default_factory=list)
    trackers: list[str] = field(default_factory=list)  # where each tracker put the run
    main: bool = True  # False on the other ranks of a distributed run (they report nothing)

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """Every optimizer step's record in metrics.jsonl (events left out)."""
        from psft_lite.tracking.metrics import read_metrics

        return [r for r in read_metrics(self.metrics_file) if "event" not in r]

    @property
    def general_ability(self) -> dict[str, Any] | None:
        """The final verdict (`eval.final` with `eval.retention`): overall and per-kind change, KL, as a dict."""
        return (self.final_eval or {}).get("general_ability")

    def scalars(self) -> dict[str, Any]:
        """The summary trackers get at the end of a run: numbers and paths only."""
        keys = (
            "steps",
            "train_seconds",
            "seconds",
            "peak_memory_mb",
            "final_nll",
            "entropy_start",
            "entropy_end",
            "entropy_kept",
            "drift",
            "drift_step",
        )
        out: dict[str, Any] = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        out.update(run_dir=str(self.run_dir), adapter=str(self.adapter), metrics=str(self.metrics_file))
        if self.merged is not None:
            out["merged"] = str(self.merged)
        return out
