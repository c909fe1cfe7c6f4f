"""Weights & Biases: offline first, its files under RUN_DIR/wandb, the run id kept so a resumed run continues it."""

from __future__ import annotations

import contextlib
import netrc
import os
import secrets
from pathlib import Path
from typing import Any


def _wandb_mode() -> str:
    """`WANDB_MODE` when set; online only when an API key is configured (environment or ~/.netrc); else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    with contextlib.suppress(OSError, netrc.NetrcParseError):
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
        if netrc.netrc().authenticators(host):
            return "online"
    return "offline"


class Wandb:
    """A W&B run with its files under RUN_DIR/wandb; its id is kept so a resumed run continues it."""

    name = "wandb"
    module = "wandb"
    extra = "wandb"  # pip install 'psft-lite[wandb]'
    replays_resumed_steps = False

    @classmethod
    def open(cls, run_dir: Path, state: dict[str, Any], project: str, start_step: int) -> Wandb:
        return cls(run_dir, state, project)

    @staticmethod
    def where(run_dir: Path, project: str, state: dict[str, Any]) -> str:
        mode = state.get("mode", "offline")
        return f"wandb ({mode}): {run_dir / 'wandb'}" + (
            f" — upload with: wandb sync {run_dir / 'wandb'}/offline-run-*" if mode == "offline" else ""
        )

    def __init__(self, run_dir: Path, state: dict[str, Any], project: str):
        self.run_dir, self.state, self.project = run_dir, state, project
        self.run: Any = None

    def start(self, config: dict[str, Any]) -> None:
        import wandb

        if "id" not in self.state:
            self.state["id"] = secrets.token_hex(4)  # W&B run ids are short lowercase alphanumerics
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", self.project),
            name=self.run_dir.name,
            id=self.state["id"],
            dir=str(self.run_dir),
            config=config,
            resume="allow",
            mode=_wandb_mode(),
            settings=wandb.Settings(console="off", silent=True),
        )
        self.state["mode"] = self.run.settings.mode

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def text(self, tag: str, message: str, step: int) -> None:
        self.run.log({tag: message}, step=step)

    def finish(self, summary: dict[str, Any], status: str, step: int) -> None:
        self.run.summary.update({f"summary/{k}": v for k, v in summary.items()})
        self.run.finish(exit_code=0 if status == "finished" else 1)
