"""The run directory's layout: every path inside a run is named here and nowhere else.

RUN_DIR/recipe.toml              the resolved recipe (its presence marks a psft-lite run directory)
RUN_DIR/metrics.jsonl            one JSON object per optimizer step (tracking.metrics writes it)
RUN_DIR/adapter/                 the final PEFT adapter (+ tokenizer, chat template, psft_lite.json)
RUN_DIR/checkpoints/step-N/      everything needed to continue the same trajectory (training.checkpoint)
RUN_DIR/merged/                  `output.save = ["merged"]` or `psft-lite merge`
RUN_DIR/eval/                    `psft-lite eval --tasks` reports
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from psft_lite.core.errors import RecipeError
from psft_lite.core.files import atomic_write_text

RUN_MARKER = "recipe.toml"  # a folder holding this file is a psft-lite run directory
METRICS = "metrics.jsonl"
ADAPTER = "adapter"
MERGED = "merged"
EVAL = "eval"
CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"  # inside a checkpoint; a step-N folder without it is not complete
ADAPTER_META = "psft_lite.json"  # beside adapter_config.json: how the base was loaded, for merge/eval/generate
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's: its presence marks an adapter folder


def recipe_file(run_dir: Path) -> Path:
    return Path(run_dir) / RUN_MARKER


def metrics_file(run_dir: Path) -> Path:
    return Path(run_dir) / METRICS


def adapter_dir(run_dir: Path) -> Path:
    return Path(run_dir) / ADAPTER


def merged_dir(run_dir: Path) -> Path:
    return Path(run_dir) / MERGED


def eval_dir(run_dir: Path) -> Path:
    return Path(run_dir) / EVAL


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step-{step}"


def is_run_dir(path: Path) -> bool:
    return recipe_file(path).is_file()


def is_adapter_dir(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first. Temporary folders of interrupted saves never match `step-N`."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def newest_adapter(path: Path) -> Path | None:
    """The adapter a run directory, adapter folder or checkpoint folder stands for: `adapter/` when the run
    finished, its newest checkpoint when it was stopped before, the folder itself when it is an adapter."""
    path = Path(path)
    if is_adapter_dir(adapter_dir(path)):
        return adapter_dir(path)
    if is_adapter_dir(path):
        return path
    ckpts = list_checkpoints(path)
    return ckpts[-1][1] if ckpts else None


def owning_run(adapter: Path) -> Path | None:
    """The run directory an adapter or checkpoint folder belongs to (its parent or grandparent), if any."""
    return next((p for p in (adapter.parent, adapter.parent.parent) if is_run_dir(p)), None)


def read_adapter_meta(path: Path) -> dict[str, Any] | None:
    p = Path(path) / ADAPTER_META
    return json.loads(p.read_text()) if p.is_file() else None


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse to mix a new run into a non-empty folder, and never delete a folder that is not a psft-lite run."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        raise RecipeError(f"output.dir {path}: {existing} is not writable; choose another output.dir.")
    if not path.exists():
        return
    if not path.is_dir():
        raise RecipeError(f"output.dir {path} exists and is a file; choose another output.dir.")
    if not any(path.iterdir()):
        return
    if not overwrite:
        resume = " Pass --resume to continue it from its last checkpoint," if list_checkpoints(path) else ""
        raise RecipeError(
            f"output.dir {path} already holds a run.{resume} Pass --overwrite to replace it, or choose another "
            "output.dir (e.g. --set output.dir=runs/new-name)."
        )
    if not is_run_dir(path):
        raise RecipeError(
            f"output.dir {path} is not empty and is not a psft-lite run directory; refusing to overwrite it. Choose "
            "another output.dir."
        )


def create_run_dir(path: Path, recipe_toml: str, checkpoint_bytes: int, keep_last: int) -> None:
    """Create (or, with --overwrite already allowed by `check_output_dir`, replace) the run directory, write the
    resolved recipe, and check that the checkpoints the run will keep fit on its disk; on failure nothing is left."""
    if path.exists():
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True)
        atomic_write_text(recipe_file(path), recipe_toml)
    except OSError as e:
        shutil.rmtree(path, ignore_errors=True)
        raise RecipeError(f"output.dir {path}: cannot write there ({e.strerror}); choose another output.dir.") from None
    need = checkpoint_bytes * (max(keep_last, 1) + 2)  # kept + the one being written + the adapter
    free = shutil.disk_usage(path).free  # measured on the run dir's own file system, so only once it exists
    if free < need:
        shutil.rmtree(path, ignore_errors=True)
        raise RecipeError(
            f"output.dir {path}: {free / 2**20:.0f} MB free, but this run's checkpoints need about {need / 2**20:.0f} "
            "MB. Free some space, lower train.keep_last, or choose another output.dir."
        )
