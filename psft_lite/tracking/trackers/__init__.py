"""Live reporting to experiment trackers: TensorBoard, Weights & Biases, MLflow and trackio (`output.report_to`).

The trackers get exactly what metrics.jsonl gets, under the same names: `metrics.MetricsWriter` hands every record it
writes to a `Reporter`, which fans it out. A step record's numbers are logged at its step; an event (eval, guard
warning, skipped step) logs its numbers at its step plus its message as text where the backend has text. At the start
each backend gets the resolved recipe (flattened, `train.lr`) and the data statistics as hyper-parameters; at the end
the run's summary.

Offline first, and the run directory stays the one place a run lives: TensorBoard and trackio write under it, MLflow
uses a SQLite store inside it unless `MLFLOW_TRACKING_URI` says otherwise, W&B writes its files under it and runs
offline unless `WANDB_MODE` says otherwise or an API key is configured (it never prompts for a login).

Resume continues the same tracker run: W&B, MLflow and trackio reuse the run id kept in `trackers.json`, and steps up
to the last one reported before the interruption are not sent again (a resumed run reproduces them exactly);
TensorBoard purges the events past the checkpoint and logs them again, as metrics.jsonl does.

A backend that raises (disk full, server gone) is reported once and dropped; training and metrics.jsonl go on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from psft_lite.core.extras import require_extra
from psft_lite.core.lazy import check_name
from psft_lite.tracking.trackers.base import Backend, Reporter, flat_config
from psft_lite.tracking.trackers.base import open_reporter as _open
from psft_lite.tracking.trackers.mlflow import Mlflow
from psft_lite.tracking.trackers.tensorboard import TensorBoard
from psft_lite.tracking.trackers.trackio import Trackio
from psft_lite.tracking.trackers.wandb import Wandb

#: the registry: `output.report_to` accepts exactly these names
BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (TensorBoard, Wandb, Mlflow, Trackio)}

__all__ = ["BACKENDS", "Backend", "Reporter", "flat_config", "open_reporter", "register", "require", "where"]


#: what a backend class must have (base.Backend)
_NEEDS = ("open", "where", "start", "scalars", "text", "finish")


def register(backend: type[Backend]) -> type[Backend]:
    """Add (or replace) a tracker backend, checked as a built-in one is: a `name` `output.report_to` can hold, the
    `module` it needs ("" for none) and `extra`, `replays_resumed_steps`, and every call of base.Backend. The recipe
    reads the table when it validates, so `report_to = ["<name>"]` works from then on."""
    name = check_name("tracker", getattr(backend, "name", None))
    missing = [a for a in _NEEDS if not callable(getattr(backend, a, None))]
    missing += [a for a in ("module", "extra") if not isinstance(getattr(backend, a, None), str)]
    missing += [] if isinstance(getattr(backend, "replays_resumed_steps", None), bool) else ["replays_resumed_steps"]
    if missing:
        raise ValueError(
            f"tracker {name!r} lacks {', '.join(missing)} (psft_lite.tracking.trackers.base.Backend says what each is)"
        )
    BACKENDS[name] = backend
    return backend


def require(names: list[str], where: str = "output.report_to") -> None:
    """One paragraph naming the extra to install when a named backend's package is missing (checked before any model
    loads, so a missing package costs a second, not a model load)."""
    for n in names:
        b = BACKENDS[n]
        if b.module:
            require_extra(
                b.module, f"{where} names {n}", otherwise=f", or remove {n} from {where}", extra=b.extra or None
            )


def open_reporter(
    names: list[str], project: str, run_dir: Path, start_step: int, reported_through: int, warn: Any
) -> Reporter:
    """The backends `names` asks for, with the state a resumed run left in RUN_DIR/trackers.json."""
    return _open([BACKENDS[n] for n in names], project, run_dir, start_step, reported_through, warn)


def where(names: list[str], project: str, run_dir: Path, state: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """One line per backend saying where its data is and how to look at it."""
    return [BACKENDS[n].where(run_dir, project, (state or {}).get(n, {})) for n in names]
