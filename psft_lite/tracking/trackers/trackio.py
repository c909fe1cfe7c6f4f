"""trackio: a local store (RUN_DIR/trackio unless TRACKIO_DIR names another), resumed by run name."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path
from typing import Any

from psft_lite.tracking.trackers.base import is_number


def _quiet() -> Any:
    """trackio prints its set-up and alert lines to stdout, which psft-lite keeps for results; the where-to-look line
    at the end of the run and the progress display say the same."""
    return contextlib.redirect_stdout(io.StringIO())


class Trackio:
    """A trackio run in the store `TRACKIO_DIR` names, else RUN_DIR/trackio; resumed by name."""

    name = "trackio"
    module = "trackio"
    extra = "trackio"  # pip install 'psft-lite[trackio]'
    replays_resumed_steps = False

    @classmethod
    def open(cls, run_dir: Path, state: dict[str, Any], project: str, start_step: int) -> Trackio:
        return cls(run_dir, state, project)

    @staticmethod
    def where(run_dir: Path, project: str, state: dict[str, Any]) -> str:
        return f"trackio: TRACKIO_DIR={state.get('dir', run_dir / 'trackio')} trackio show --project {project}"

    def __init__(self, run_dir: Path, state: dict[str, Any], project: str):
        self.run_dir, self.state, self.project = run_dir, state, project
        self.run: Any = None

    def start(self, config: dict[str, Any]) -> None:
        # trackio reads TRACKIO_DIR once, when it is first imported; a later run in the same process (a study) logs
        # where the first one did, and the state file records where that is
        if "trackio" not in sys.modules and not os.environ.get("TRACKIO_DIR"):
            os.environ["TRACKIO_DIR"] = str((self.run_dir / "trackio").resolve())
            try:
                import trackio
            finally:
                del os.environ["TRACKIO_DIR"]
        import trackio
        from trackio.utils import TRACKIO_DIR

        self.state.update(project=self.project, name=self.run_dir.name, dir=str(TRACKIO_DIR))
        with _quiet():
            self.run = trackio.init(
                project=self.project,
                name=self.run_dir.name,
                config=config,
                resume="allow",
                auto_log_cpu=False,
                auto_log_gpu=False,
            )

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def text(self, tag: str, message: str, step: int) -> None:
        from trackio import AlertLevel

        with _quiet():
            self.run.alert(title=tag, text=message, level=AlertLevel.WARN, step=step)

    def finish(self, summary: dict[str, Any], status: str, step: int) -> None:
        import trackio

        with _quiet():
            numbers = {f"summary/{k}": float(v) for k, v in summary.items() if is_number(v)}
            if numbers:  # on the last step, not a step of its own
                self.run.log(numbers, step=step)
            trackio.finish()  # the module-level finish also forgets the run, so its exit hook does not finish it again
