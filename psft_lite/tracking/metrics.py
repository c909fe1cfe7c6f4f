"""The one metrics path: per-step statistics → metrics.jsonl and the live progress display, from the same dict.

Key names (docs/ARCHITECTURE.md) are shared by plot, eval, README: step, epoch, loss, nll, entropy, grad_norm, lr,
tokens, trained_tokens, tokens_per_s, step_s, peak_mem_mb; psft adds clip_frac, ratio_mean, ratio_max, approx_kl;
idft adds phi_mean, phi_std, gamma_mean, weight_mean, lambda.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from psft_lite.core.files import atomic_file


class StepStats:
    """Combines micro-batch statistics into exact step values: token-weighted means, maxima for `*_max`."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.maxes: dict[str, float] = {}
        self.weight = 0
        self.loss = 0.0

    def add(self, stats: dict[str, torch.Tensor | float], n_tokens: int, loss: float) -> None:
        self.loss += loss
        self.weight += n_tokens
        for k, v in stats.items():
            v = float(v)
            if k.endswith("_max"):
                self.maxes[k] = max(self.maxes.get(k, -math.inf), v)
            else:
                self.sums[k] = self.sums.get(k, 0.0) + v * n_tokens

    def reduce(self, dist: Any, keys: list[str], max_keys: list[str]) -> None:
        """Combine the statistics of all ranks (sums for means, max for maxima); keys are fixed per objective so
        that a rank without micro-batches in a short last step still joins with zeros."""
        if not dist.enabled:
            return
        t = torch.tensor([self.loss, float(self.weight)] + [self.sums.get(k, 0.0) for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        self.loss, self.weight = float(t[0]), int(t[1])
        self.sums = {k: float(t[2 + i]) for i, k in enumerate(keys)}
        if max_keys:
            m = torch.tensor([self.maxes.get(k, -math.inf) for k in max_keys], dtype=torch.float64)
            dist.all_reduce(m, op="max")
            self.maxes = {k: float(m[i]) for i, k in enumerate(max_keys)}

    def result(self) -> dict[str, float]:
        out = {"loss": self.loss}
        out.update({k: v / max(self.weight, 1) for k, v in self.sums.items()})
        out.update(self.maxes)
        return out


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 1024)


def _round(v: Any) -> Any:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return float(f"{v:.6g}")
    return v


class MetricsWriter:
    """Appends one JSON object per line to metrics.jsonl, flushed at once (readable while the run goes on), and hands
    the same record to `forward` (the trackers, trackers.Reporter.record), so file and trackers cannot disagree."""

    def __init__(self, path: Path | None, forward: Callable[[dict[str, Any]], None] | None = None):
        """`None`: a writer that writes nothing (ranks other than 0 of a distributed run)."""
        self.path = path
        self.forward = forward if path is not None else None
        self._f: TextIO | None = open(path, "a", encoding="utf-8") if path is not None else None

    def write(self, record: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps({k: _round(v) for k, v in record.items()}) + "\n")
            self._f.flush()
        if self.forward is not None:
            self.forward(record)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------------------
# Reading JSON-lines files psft-lite wrote (metrics.jsonl, study results, hint outputs). Every record is written whole
# with its newline and flushed, so only a last line without a newline can be torn (the writer was killed mid-line).


def _lines(path: Path) -> list[tuple[bytes, dict[str, Any] | None, bool]]:
    """(raw line, its record or None if it is not a JSON object, whether it is an unterminated last line)."""
    raw = Path(path).read_bytes()
    parts = raw.split(b"\n")  # the text after the last newline is parts[-1] ("" when the file ends with one)
    out = []
    for i, line in enumerate(parts):
        last = i == len(parts) - 1
        if last and not line:
            break
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            rec = None
        out.append((line, rec if isinstance(rec, dict) else None, last))
    return out


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a JSON-lines file, skipping unreadable lines (a torn last line from a killed run)."""
    return [rec for line, rec, _ in _lines(path) if rec is not None and line.strip()]


def read_records(path: Path, key: str, what: str) -> list[dict[str, Any]]:
    """Records of an output psft-lite appends to and resumes (every record has `key`), repairing the file: a torn last
    line is cut off, a whole last record that lost its newline gets one. Any other line that is not such a record
    means the file is not ours: `DataError` naming file:line (`what` is the command that writes it), file untouched."""
    from psft_lite.core.errors import DataError

    if not Path(path).exists():
        return []
    records, good, lines = [], b"", _lines(path)
    for n, (line, rec, unterminated) in enumerate(lines, 1):
        ours = rec is not None and key in rec
        if not line.strip():
            good += line + b"\n"
            continue
        if not ours and unterminated:
            break  # torn: dropped below
        if not ours:
            raise DataError(f"{path}:{n}: not a line written by {what}; use another --out.")
        records.append(rec)
        good += line + b"\n"
    if lines and good != Path(path).read_bytes():
        with atomic_file(Path(path)) as tmp:  # the repaired file replaces the torn one in one rename
            tmp.write_bytes(good)
    return records


def run_outcome(path: Path, edge: int = 5) -> dict[str, Any]:
    """What a finished run did to the model, from its metrics.jsonl (every step, resumed runs included): the entropy on
    the trained tokens over its first and last `edge` steps, the share of it kept, and the last measured drift."""
    steps = [rec for rec in read_metrics(path) if "event" not in rec and "entropy" in rec]
    out: dict[str, Any] = {}
    if steps:
        first, last = steps[:edge], steps[-edge:]
        out["entropy_start"] = sum(rec["entropy"] for rec in first) / len(first)
        out["entropy_end"] = sum(rec["entropy"] for rec in last) / len(last)
        out["entropy_kept"] = out["entropy_end"] / out["entropy_start"] if out["entropy_start"] > 0 else None
    drifts = [rec for rec in steps if isinstance(rec.get("drift"), (int, float))]
    if drifts:
        out["drift"], out["drift_step"] = drifts[-1]["drift"], drifts[-1]["step"]
    return out


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the records of steps <= `step` (a resumed run rewrites the later ones) and drop a torn line, atomically.
    Returns the last step the file had before (what the trackers were already sent)."""
    if not Path(path).exists():
        return 0
    lines = [(line, rec) for line, rec, _ in _lines(path) if rec is not None]
    keep = [line for line, rec in lines if float(rec.get("step", 0)) <= step]
    with atomic_file(Path(path)) as tmp:
        tmp.write_bytes(b"".join(line + b"\n" for line in keep))
    return max((int(rec.get("step", 0)) for _, rec in lines), default=0)


class ProgressDisplay:
    """A rich progress bar on a terminal; plain periodic lines otherwise (CI logs, pipes)."""

    FIELDS = (
        ("loss", "loss", "{:.4f}"),
        ("nll", "nll", "{:.3f}"),
        ("entropy", "H", "{:.3f}"),
        ("clip_frac", "clip", "{:.3f}"),
        ("phi_mean", "φ", "{:+.3f}"),
        ("tokens_per_s", "tok/s", "{:.0f}"),
    )

    def __init__(self, console: Console, total: int, start: int = 0, every: int = 10, label: str = "train"):
        self.console = console
        self.total = total
        self.every = every
        self.live = console.is_terminal
        self._progress: Progress | None = None
        self._t0 = time.monotonic()
        self._start = start
        if self.live:
            self._progress = Progress(
                TextColumn(f"[bold]{label}[/bold]"),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self._task = self._progress.add_task(label, total=total, completed=start, stats="")
            self._progress.start()

    def _fmt(self, rec: dict[str, Any]) -> str:
        parts = []
        for key, name, fmt in self.FIELDS:
            if key in rec and isinstance(rec[key], (int, float)):
                parts.append(f"{name} {fmt.format(rec[key])}")
        return "  ".join(parts)

    def update(self, rec: dict[str, Any]) -> None:
        step = rec["step"]
        if self._progress is not None:
            self._progress.update(self._task, completed=step, stats=self._fmt(rec))
        elif step % self.every == 0 or step == self.total or step == self._start + 1:
            elapsed = time.monotonic() - self._t0
            rate = (step - self._start) / elapsed if elapsed > 0 else 0.0
            eta = (self.total - step) / rate if rate > 0 else 0.0
            self.console.print(f"step {step}/{self.total}  {self._fmt(rec)}  eta {eta:.0f}s", highlight=False)

    def warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False)

    def note(self, rec: dict[str, Any]) -> None:
        """An event line (eval results, warnings) above the progress bar."""
        parts = [
            f"{k.removeprefix('eval_')} {v:.4g}"
            for k, v in rec.items()
            if k.startswith("eval_") and isinstance(v, float)
        ]
        self.console.print(
            f"{rec.get('event', 'event')} @ step {rec.get('step')}: " + "  ".join(parts), highlight=False
        )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
