"""TensorBoard: `torch.utils.tensorboard` event files under RUN_DIR/tensorboard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from psft_lite.tracking.trackers.base import summary_text


class TensorBoard:
    """`torch.utils.tensorboard` into RUN_DIR/tensorboard; on resume, events past the checkpoint are purged."""

    name = "tensorboard"
    module = "tensorboard"
    extra = "tensorboard"  # pip install 'psft-lite[tensorboard]'
    replays_resumed_steps = True  # it purged the events past the checkpoint, so it takes them again

    @classmethod
    def open(cls, run_dir: Path, state: dict[str, Any], project: str, start_step: int) -> TensorBoard:
        return cls(run_dir, state, start_step)

    @staticmethod
    def where(run_dir: Path, project: str, state: dict[str, Any]) -> str:
        return f"tensorboard: tensorboard --logdir {run_dir / 'tensorboard'}"

    def __init__(self, run_dir: Path, state: dict[str, Any], start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops events at steps >= it that an earlier writer left (records are 1-based)
        purge = start_step + 1 if start_step else None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge, flush_secs=10)

    def start(self, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        self.writer.add_text("recipe", "\n".join(f"    {k} = {v}" for k, v in config.items()))
        exp, ssi, sei = hparams(config, {})
        for summ in (exp, ssi, sei):
            self.writer.file_writer.add_summary(summ)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def text(self, tag: str, message: str, step: int) -> None:
        self.writer.add_text(tag, message, step)

    def finish(self, summary: dict[str, Any], status: str, step: int) -> None:
        self.writer.add_text("summary", f"status: {status}\n\n" + summary_text(summary), step)
        self.writer.close()
