"""Training checkpoints and the final adapter: saving, pruning, and finding and checking what to resume from.

Paths inside the run directory come from core.rundir; every folder is written through core.files.atomic_dir, so a
crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from psft_lite import __version__
from psft_lite.core.errors import RecipeError, RunError
from psft_lite.core.files import OLD_MARK, TMP_MARK, atomic_dir
from psft_lite.core.rundir import (
    ADAPTER_META,
    STATE_FILE,
    checkpoint_dir,
    checkpoints_dir,
    list_checkpoints,
    recipe_file,
)


def checkpoint_size(n_trainable: int) -> int:
    """Bytes of one checkpoint: adapter + two AdamW moments in float32, plus small files."""
    return n_trainable * 4 * 3 + 2**20


def save_adapter(
    model: Any, tokenizer: Any, path: Path, meta: dict[str, Any], state_dict: dict[str, Any] | None = None
) -> Path:
    """A plain PEFT adapter folder (loadable by `PeftModel.from_pretrained`) with the tokenizer and chat template.
    `state_dict`: the adapter's weights gathered whole, when the model holds only shards of them (sharding.py)."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        (tmp / ADAPTER_META).write_text(json.dumps({"psft_lite_version": __version__, **meta}, indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Training checkpoints: checkpoints/step-N/ holds everything needed to continue the same trajectory.
#
#   adapter_model.safetensors, adapter_config.json   the LoRA weights (a plain PEFT adapter)
#   optimizer.pt                                      optimizer state (torch.save, loadable with weights_only=True)
#   policy.pt                                         psft old-policy state (snapshot cache / base log-prob cache)
#   rng.pt                                            python, numpy, torch (and CUDA) RNG states
#   trainer_state.json                                step, epoch, consecutive bad steps, data order, versions
#   recipe.toml                                       the resolved recipe of the run
#
# The data position is the step: the order of examples is a pure function of (train.seed, epoch), and the learning
# rate a pure function of the step, so neither a sampler nor a scheduler object needs saving.


@dataclass
class TrainState:
    step: int  # optimizer steps completed
    epoch: float
    data: dict[str, Any] = field(default_factory=dict)  # n_examples, batch_size, seed: the data order's identity
    guard: dict[str, Any] = field(default_factory=dict)  # guard-rail running statistics
    scaler: dict[str, Any] = field(default_factory=dict)  # fp16 loss scaler (scale, growth tracker); empty otherwise


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    v, keys, *rest = state["numpy"]
    random.setstate(_tuples(state["python"]))
    np.random.set_state((v, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x: Any) -> Any:
    return tuple(_tuples(i) for i in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(
    run_dir: Path,
    model: Any,
    optimizer: Any,
    policy_state: dict[str, Any],
    state: TrainState,
    recipe_toml: str,
    keep_last: int,
    adapter_state: dict[str, Any] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoints/step-N/ atomically, then prune to the newest `keep_last`; returns its path. A failed write
    (disk full, quota, a vanished mount) leaves nothing half-written and says which checkpoint is intact. A sharded
    run passes its adapter and optimizer states gathered whole (sharding.py): the same files as one process."""
    final = checkpoint_dir(run_dir, state.step)
    try:
        with atomic_dir(final) as tmp:
            model.save_pretrained(tmp, safe_serialization=True, state_dict=adapter_state)
            (tmp / "README.md").unlink(missing_ok=True)
            torch.save(optimizer_state if optimizer_state is not None else optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(policy_state, tmp / "policy.pt")
            torch.save(rng_state(), tmp / "rng.pt")
            recipe_file(tmp).write_text(recipe_toml, encoding="utf-8")
            (tmp / STATE_FILE).write_text(
                json.dumps({**asdict(state), "psft_lite_version": __version__}, indent=2) + "\n"
            )
    except OSError as e:
        kept = list_checkpoints(run_dir)
        last = (
            f"the last good checkpoint, {kept[-1][1]}, is intact: free space and continue with --resume"
            if kept
            else "no earlier checkpoint exists"
        )
        raise RunError(
            f"could not write checkpoint step-{state.step} into {checkpoints_dir(run_dir)} ({e.strerror or e}); {last}."
        ) from None
    prune_checkpoints(run_dir, keep_last)
    return final


def load_checkpoint(path: Path, model: Any, optimizer: Any) -> tuple[TrainState, dict[str, Any]]:
    """Restore adapter weights, optimizer and RNG from `path`; returns the train state and the policy state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from psft_lite.training import sharding

    path = Path(path)
    weights = load_file(path / "adapter_model.safetensors")
    sharded = sharding.is_sharded(model)
    if sharded:  # a checkpoint holds whole tensors: each process keeps its shard
        missing = sharding.load_adapter_state(model, weights)
    else:
        result = set_peft_model_state_dict(model, weights)
        missing = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
    if missing:
        raise RunError(f"{path}: adapter weights do not fit this model (e.g. {missing[0]}).")
    device = next(p.device for p in model.parameters() if p.requires_grad)
    optim_state = torch.load(path / "optimizer.pt", map_location="cpu" if sharded else device, weights_only=True)
    if sharded:
        sharding.load_optimizer_state(optimizer, optim_state)
    else:
        optimizer.load_state_dict(optim_state)
    policy_state = torch.load(path / "policy.pt", map_location="cpu", weights_only=True)
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    raw = json.loads((path / STATE_FILE).read_text())
    state = TrainState(
        step=raw["step"],
        epoch=raw["epoch"],
        data=raw.get("data", {}),
        guard=raw.get("guard", {}),
        scaler=raw.get("scaler", {}),
    )
    return state, policy_state


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints (0 keeps all); remove leftovers of interrupted saves."""
    ckpts = list_checkpoints(run_dir)
    if keep_last > 0:
        for _, p in ckpts[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
    root = checkpoints_dir(run_dir)
    if root.is_dir():
        for p in root.iterdir():
            if TMP_MARK in p.name or OLD_MARK in p.name:
                shutil.rmtree(p, ignore_errors=True)


def find_checkpoint(run_dir: Path, spec: str) -> Path:
    """`latest` → the newest complete checkpoint of `run_dir`; otherwise `spec` is a checkpoint folder."""
    if spec == "latest":
        ckpts = list_checkpoints(run_dir)
        if not ckpts:
            raise RecipeError(
                f"--resume: no checkpoint in {checkpoints_dir(run_dir)} to resume from. Checkpoints are written "
                "every train.save_every steps and when a run is interrupted."
            )
        return ckpts[-1][1]
    p = Path(spec)
    if not (p / STATE_FILE).is_file():
        have = ", ".join(c.name for _, c in list_checkpoints(run_dir)) or "none"
        raise RecipeError(
            f"--resume {spec}: not a checkpoint folder (no {STATE_FILE}). Checkpoints of this run: {have}."
        )
    return p


def open_resume(
    run_dir: Path, spec: str, recipe: Any, total_steps: int, steps_per_epoch: int | None = None
) -> tuple[Path, list[str]]:
    """The checkpoint `--resume spec` names, after checking that resuming it with `recipe` continues the same run;
    returns it with warnings (a changed run length under a decaying lr schedule is said exactly). `RecipeError` when
    the recipe changes the math or asks for no further steps."""
    from psft_lite.recipe.schema import load_recipe, math_differences

    path = find_checkpoint(run_dir, spec)
    saved = load_recipe(recipe_file(path))
    diffs = math_differences(saved, recipe)
    if diffs:
        key, old, new = diffs[0]
        more = f" (and {len(diffs) - 1} more: {', '.join(d[0] for d in diffs[1:4])})" if len(diffs) > 1 else ""
        raise RecipeError(
            f"--resume: the checkpoint {path} was trained with {key} = {old!r}, but the recipe now says "
            f"{new!r}{more}. Resuming would not continue the same run; restore the key, or start a new run in another "
            "output.dir."
        )
    step = json.loads((path / STATE_FILE).read_text())["step"]
    if step >= total_steps:
        raise RecipeError(
            f"--resume: {path} is at step {step}, and the recipe asks for {total_steps} steps in all; raise "
            "train.max_steps (or train.epochs) to train further."
        )
    warnings = []
    if steps_per_epoch is not None:
        from psft_lite.training.schedules import lr_at

        t = saved.train
        saved_total = t.max_steps if t.max_steps is not None else max(1, math.ceil(t.epochs * steps_per_epoch))
        if saved_total != total_steps and t.schedule != "constant" and step >= t.warmup_steps:
            old, new = lr_at(step, saved_total, t), lr_at(step, total_steps, recipe.train)
            warnings.append(
                f"the run now has {total_steps} steps instead of {saved_total}, so its {t.schedule} learning-rate "
                f"schedule changes: from step {step + 1} the lr is {new:.3g} (the original run had {old:.3g}), and it "
                f"decays to its floor at step {total_steps} instead of {saved_total}. To keep the original schedule, "
                f"resume with the original length and start a new run for more steps."
            )
    return path, warnings
