"""The study's methods and grid cells: what `psft-lite study` trains and how its runs are named (runner.py plans and
runs them, report.py tabulates them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psft_lite.training.objectives import method_keys, methods

#: Each method is a set of objective.* settings (objectives.py's table); everything else (lr, batch, steps, seed) is
#: shared. Methods that change more than the objective name their other recipe keys with dots: self-replay is sft with
#: a fifth of every epoch the base model's own answers to general prompts.
METHODS: dict[str, dict[str, Any]] = {**methods(), "sft-replay": {"kind": "sft", "data.replay.ratio": 0.2}}


def reads(method: str) -> set[str]:
    """The objective.* keys a study method reads (a method with extra recipe keys reads what its objective reads)."""
    kind = METHODS[method]["kind"]
    return method_keys(method if method in methods() else kind)


PROBE = "probe"  # the eval set measuring forgetting: accuracy, NLL and KL to the base model


@dataclass(frozen=True)
class Cell:
    """One point of the sweep for one method: recipe overrides as (dotted key, value) pairs, in sweep order."""

    values: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        """`lr=0.0001 refresh_every=4` (the key's last part; the whole key where two would read the same)."""
        last = [k.rsplit(".", 1)[-1] for k, _ in self.values]
        names = [k if last.count(k.rsplit(".", 1)[-1]) > 1 else k.rsplit(".", 1)[-1] for k, _ in self.values]
        return " ".join(f"{n}={_fmt(v)}" for n, (_, v) in zip(names, self.values))

    def run_name(self, method: str, seed: int) -> str:
        return f"{method}-{self.label.replace(' ', ',')}-s{seed}" if self.values else f"{method}-s{seed}"


def _fmt(v: Any) -> str:
    """A value as labels and run names show it: a file by its stem (`data.train=data/x/hinted.jsonl` → `hinted`)."""
    if isinstance(v, float):
        return f"{v:g}"
    return Path(v).stem if isinstance(v, str) and ("/" in v or v.endswith((".jsonl", ".json", ".parquet"))) else str(v)
