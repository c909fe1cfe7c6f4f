"""An adapter and the base it applies to: where a run's adapter is, how its base was loaded for training, and
that base loaded again the same way (4-bit kept 4-bit, or dequantized for merging). Used by generate, eval, merge
and export alike, so every command sees the model that was trained."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from psft_lite.core import rundir
from psft_lite.core.errors import ModelError
from psft_lite.model import loading, runtime
from psft_lite.recipe.schema import ModelSection


@dataclass
class AdapterInfo:
    path: Path
    base: ModelSection
    dtype: str | None  # training dtype as resolved (bfloat16 / float32 / float16)
    run_dir: Path | None

    def train_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype the adapter was trained in: as recorded, else what the base section resolves to on `device`."""
        return getattr(torch, self.dtype) if self.dtype else runtime.resolve_dtype(self.base.dtype, device)


def resolve_adapter(path: Path, base_override: str | None = None) -> AdapterInfo:
    """A run dir, an adapter folder or a checkpoint folder → the adapter and how its base was loaded."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such run directory or adapter folder.")
    adapter = rundir.newest_adapter(path)
    if adapter is None:
        raise ModelError(
            f"{path}: not an adapter (no adapter_config.json) and not a run directory with an adapter/ folder. Pass a "
            "run directory (e.g. runs/quickstart), its adapter/ or a checkpoints/step-N folder."
        )
    run_dir = rundir.owning_run(adapter)
    base, dtype = _base_section(adapter, run_dir, base_override)
    if base_override:
        base = base.model_copy(update={"name": base_override})
    return AdapterInfo(adapter, base, dtype, run_dir)


def _base_section(adapter: Path, run_dir: Path | None, base_override: str | None) -> tuple[ModelSection, str | None]:
    """How the base was loaded: from psft_lite.json, else the run's (or checkpoint's) recipe, else PEFT's config."""
    meta = rundir.read_adapter_meta(adapter)
    if meta:
        return ModelSection.model_validate(meta["base_model"]), meta.get("dtype")
    if rundir.is_run_dir(adapter) or run_dir is not None:
        from psft_lite.recipe.schema import load_recipe

        return load_recipe(rundir.recipe_file(adapter if rundir.is_run_dir(adapter) else run_dir)).model, None
    cfg = json.loads((adapter / rundir.ADAPTER_CONFIG).read_text())
    name = cfg.get("base_model_name_or_path")
    if not name and not base_override:
        raise ModelError(f"{adapter}: the adapter does not say which base it was trained on; pass --base NAME.")
    return ModelSection(name=name or base_override), None


def is_adapter_source(path: Path) -> bool:
    """Whether `path` is a run directory (finished or stopped), an adapter or a checkpoint folder."""
    return rundir.newest_adapter(path) is not None


def with_adapter(base: Any, info: AdapterInfo) -> Any:
    """`base` wrapped with the trained adapter (plain PEFT), or a clear error when it was trained on another model."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, info.path)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ModelError(f"{info.path}: the adapter does not fit the base model {info.base.name!r}: {e}") from None


def base_as_trained(
    info: AdapterInfo, device: torch.device, train_dtype: torch.dtype, out_dtype: torch.dtype, from_original: bool
) -> Any:
    """The base weights the adapter applies to, in `out_dtype`: a 4-bit base loaded in 4-bit and dequantized (what
    training saw), or with `from_original` (and for any other base) the full-precision weights."""
    if info.base.load_in_4bit and not from_original:
        base = loading.load_base_model(info.base, device, train_dtype).dequantize()
    else:
        base = loading.load_base_model(info.base.model_copy(update={"load_in_4bit": False}), device, out_dtype)
    return base.to(out_dtype)


def run_conversations(run_dir: Path | None, n: int) -> list[list[dict[str, str]]]:
    """The first `n` training conversations of a run (for checking logits on what it was trained on); empty when
    there is no run or its data has moved since training."""
    if run_dir is None:
        return []
    try:
        from psft_lite.data import load_conversations
        from psft_lite.recipe.schema import load_recipe

        recipe = load_recipe(rundir.recipe_file(run_dir))
        first = recipe.data.train[0]
        return [m for m, _ in load_conversations(first, recipe.data.row_format(first), limit=n)]
    except Exception:  # the data may have moved since training; callers fall back to generic prompts
        return []
