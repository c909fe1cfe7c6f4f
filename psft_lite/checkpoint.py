"""Everything a run writes that must never be half-written: the adapter folder and checkpoints.

A folder is written as `<name>.tmp-XXXX/`, its files fsynced, then renamed into place in one `os.replace`; a crash
mid-write leaves the previous version intact and a `.tmp-` folder that is never mistaken for the real one.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from psft_lite import __version__
from psft_lite.errors import RecipeError, RunError

ADAPTER_META = "psft_lite.json"  # beside adapter_config.json: how the base was loaded, for merge/eval/generate


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it replaces `final` atomically, on failure it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any other folder
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if final.exists():
            old = final.parent / f"{final.name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_adapter(model: Any, tokenizer: Any, path: Path, meta: dict[str, Any]) -> Path:
    """A plain PEFT adapter folder (loadable by `PeftModel.from_pretrained`) with the tokenizer and chat template."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / ADAPTER_META).write_text(json.dumps({"psft_lite_version": __version__, **meta}, indent=2) + "\n")
    return path


def read_adapter_meta(path: Path) -> dict[str, Any] | None:
    p = Path(path) / ADAPTER_META
    return json.loads(p.read_text()) if p.is_file() else None


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

CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"


@dataclass
class TrainState:
    step: int  # optimizer steps completed
    epoch: float
    data: dict[str, Any] = field(default_factory=dict)  # n_examples, batch_size, seed: the data order's identity
    guard: dict[str, Any] = field(default_factory=dict)  # guard-rail running statistics


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
    run_dir: Path, model: Any, optimizer: Any, policy_state: dict[str, Any], state: TrainState, recipe_toml: str
) -> Path:
    """Write checkpoints/step-N/ atomically; returns its path."""
    final = Path(run_dir) / CHECKPOINTS / f"step-{state.step}"
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "README.md").unlink(missing_ok=True)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(policy_state, tmp / "policy.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "recipe.toml").write_text(recipe_toml, encoding="utf-8")
        (tmp / STATE_FILE).write_text(json.dumps({**asdict(state), "psft_lite_version": __version__}, indent=2) + "\n")
    return final


def load_checkpoint(path: Path, model: Any, optimizer: Any) -> tuple[TrainState, dict[str, Any]]:
    """Restore adapter weights, optimizer and RNG from `path`; returns the train state and the policy state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    weights = load_file(path / "adapter_model.safetensors")
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
    if missing:
        raise RunError(f"{path}: adapter weights do not fit this model (e.g. {missing[0]}).")
    device = next(p.device for p in model.parameters() if p.requires_grad)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    policy_state = torch.load(path / "policy.pt", map_location="cpu", weights_only=True)
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    raw = json.loads((path / STATE_FILE).read_text())
    state = TrainState(step=raw["step"], epoch=raw["epoch"], data=raw.get("data", {}), guard=raw.get("guard", {}))
    return state, policy_state


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first. Temporary folders of interrupted saves never match `step-N`."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints (0 keeps all); remove leftovers of interrupted saves."""
    ckpts = list_checkpoints(run_dir)
    if keep_last > 0:
        for _, p in ckpts[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if ".tmp-" in p.name or ".old-" in p.name:
                shutil.rmtree(p, ignore_errors=True)


def find_checkpoint(run_dir: Path, spec: str) -> Path:
    """`latest` → the newest complete checkpoint of `run_dir`; otherwise `spec` is a checkpoint folder."""
    if spec == "latest":
        ckpts = list_checkpoints(run_dir)
        if not ckpts:
            raise RecipeError(
                f"--resume: no checkpoint in {Path(run_dir) / CHECKPOINTS} to resume from. Checkpoints are written "
                "every train.save_every steps and when a run is interrupted."
            )
        return ckpts[-1][1]
    p = Path(spec)
    if not (p / STATE_FILE).is_file():
        have = ", ".join(c.name for _, c in list_checkpoints(run_dir)) or "none"
        raise RecipeError(f"--resume {spec}: not a checkpoint folder (no {STATE_FILE}). Checkpoints of this run: {have}.")
    return p
