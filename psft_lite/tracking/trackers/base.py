"""The interface every tracker backend implements, and the fan-out that sends each metrics record to all of them.

A backend is a class with a `name`, the `module` it needs, `open(...)` and `where(...)`, and the four calls
`start`, `scalars`, `text`, `finish`; it is registered by adding it to `BACKENDS` in this package's `__init__`, or
from Python with `psft_lite.register_tracker`.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Protocol

from psft_lite.core.files import atomic_write_text

STATE_FILE = "trackers.json"  # in the run directory: what resuming each backend needs (run ids, store)


class Backend(Protocol):
    name: str
    module: str  # the package it needs
    extra: str  # the psft-lite extra that installs it
    replays_resumed_steps: bool  # True: on resume it dropped the steps past the checkpoint and takes them again

    @classmethod
    def open(cls, run_dir: Path, state: dict[str, Any], project: str, start_step: int) -> Backend: ...

    @staticmethod
    def where(run_dir: Path, project: str, state: dict[str, Any]) -> str: ...

    def start(self, config: dict[str, Any]) -> None: ...

    def scalars(self, values: dict[str, float], step: int) -> None: ...

    def text(self, tag: str, message: str, step: int) -> None: ...

    def finish(self, summary: dict[str, Any], status: str, step: int) -> None: ...


def flat_config(recipe_dump: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`{"train": {"lr": 1e-3}}` → `{"train.lr": 1e-3}`; lists and tables become strings (every tracker takes those)."""
    out: dict[str, Any] = {}
    for section, values in recipe_dump.items():
        for key, v in values.items():
            out[f"{section}.{key}"] = v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
    out.update(extra)
    return out


def summary_text(summary: dict[str, Any]) -> str:
    return "\n".join(f"- {k}: {v}" for k, v in summary.items())


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ---------------------------------------------------------------------------------------------------------------------
# The fan-out


class Reporter:
    """Sends each metrics record to every backend. A backend that raises is reported once and dropped.

    `reported_through`: the last step the backends already have from before a resume (W&B, MLflow and trackio skip
    records up to it; TensorBoard purged them and takes them again)."""

    def __init__(
        self,
        backends: list[Backend],
        warn: Any,
        reported_through: int = 0,
        state_path: Path | None = None,
        state: dict[str, dict[str, Any]] | None = None,
    ):
        self.backends = backends
        self.warn = warn
        self.reported_through = reported_through
        self.step = reported_through  # the last step seen
        self.state_path = state_path
        self.state = state if state is not None else {}  # per backend: what resuming needs (run ids, store)

    def _call(self, backend: Backend, what: str, *args: Any) -> None:
        if backend not in self.backends:
            return
        try:
            getattr(backend, what)(*args)
        except Exception as e:  # a tracker must never stop training  # noqa: BLE001
            self.backends.remove(backend)
            self.warn(
                f"reporting to {backend.name} failed ({type(e).__name__}: {str(e).strip()[:300]}); training goes on "
                f"without it, and metrics.jsonl stays complete."
            )

    def _again(self, backend: Backend, step: int) -> bool:
        return not backend.replays_resumed_steps and step <= self.reported_through

    def start(self, config: dict[str, Any]) -> None:
        for b in list(self.backends):
            self._call(b, "start", config)
        self.save_state()

    def record(self, rec: dict[str, Any]) -> None:
        """One metrics.jsonl record: a step (numbers at its step) or an event (its numbers and its message)."""
        step = int(rec.get("step", 0))
        self.step = max(self.step, step)
        event = rec.get("event")
        values = {k: float(v) for k, v in rec.items() if k not in ("step", "event") and is_number(v)}
        if event is not None and event != "eval":
            values = {f"{event}/{k}": v for k, v in values.items()}
            values[f"events/{event}"] = 1.0  # a marker on the step the event happened
        for b in list(self.backends):
            if self._again(b, step):
                continue
            self._call(b, "scalars", values, step)
            if event is not None and "message" in rec:
                self._call(b, "text", event, str(rec["message"]), step)

    def finish(self, summary: dict[str, Any], status: str) -> None:
        for b in list(self.backends):
            self._call(b, "finish", summary, status, self.step)
        self.backends = []
        self.save_state()

    def save_state(self) -> None:
        if self.state_path is None or not self.state:
            return
        atomic_write_text(self.state_path, json.dumps(self.state, indent=1))


def open_reporter(
    backends: list[type[Backend]], project: str, run_dir: Path, start_step: int, reported_through: int, warn: Any
) -> Reporter:
    """The given backends, opened with the state a resumed run left in RUN_DIR/trackers.json."""
    path = run_dir / STATE_FILE
    state: dict[str, dict[str, Any]] = {}
    if start_step and path.is_file():
        with contextlib.suppress(json.JSONDecodeError, OSError):
            state = json.loads(path.read_text(encoding="utf-8"))
    reporter = Reporter([], warn, reported_through, path, state)
    for cls in backends:
        try:
            backend = cls.open(run_dir, state.setdefault(cls.name, {}), project, start_step)
        except Exception as e:  # noqa: BLE001
            warn(f"could not start reporting to {cls.name} ({type(e).__name__}: {e}); training goes on without it.")
            continue
        reporter.backends.append(backend)
    return reporter
