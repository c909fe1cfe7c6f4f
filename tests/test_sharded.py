"""Sharded (FSDP) training under torchrun (gloo, 2 CPU processes): the one-process trajectory, the one-process adapter
layout, resume, and clear refusals. Its own module so a test worker runs it beside test_distributed.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_distributed import TRAIN, launch, losses, same_trajectory, single_runs

from conftest import make_recipe


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, tiny_model_dir) -> dict[str, tuple[Path, Path]]:
    """The one-process reference runs, trained once for this module."""
    return single_runs(tmp_path_factory, tiny_model_dir, ["sft", "psft-base", "psft"])


def adapter_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("objective", ["sft", "psft-base"])
def test_sharded_training_follows_the_single_process_trajectory_and_writes_the_same_adapter(
    tmp_path, single_process, objective, capsys
):
    from conftest import run_cli

    recipe, one = single_process[objective]
    two = tmp_path / "fsdp"
    p = launch(["train", str(recipe), "--set", f"output.dir={two}", "--set", "train.strategy=fsdp"], 2)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "sharded (FSDP) over 2 processes" in p.stderr
    same_trajectory(losses(one), losses(two))
    a, b = adapter_weights(one), adapter_weights(two)
    assert sorted(a) == sorted(b)  # the one-process layout: a plain PEFT adapter, gathered whole
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    assert sorted(x.name for x in two.iterdir()) == ["adapter", "checkpoints", "metrics.jsonl", "recipe.toml"]
    if objective == "sft":  # and it merges like any run
        code, out, err = run_cli(capsys, "merge", str(two), "--out", str(tmp_path / "merged"))
        assert code == 0, err
        assert "merge check" in (out + err).lower()


def test_an_interrupted_sharded_run_resumes_on_the_uninterrupted_trajectory(tmp_path, single_process):
    recipe, ref = single_process["psft"]  # the snapshot old policy: its cache must survive the cut
    cut = tmp_path / "cut"
    fsdp = ["--set", "train.strategy=fsdp"]
    p = launch(["train", str(recipe), "--set", f"output.dir={cut}", "--set", "train.max_steps=2", *fsdp], 2)
    assert p.returncode == 0, p.stderr[-2000:]
    p = launch(["train", str(cut / "recipe.toml"), "--resume", "--set", "train.max_steps=4"], 2)
    assert p.returncode == 0, p.stderr[-2000:]
    same_trajectory(losses(ref), losses(cut))
    a, b = adapter_weights(ref), adapter_weights(cut)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def test_sharding_without_a_launcher_or_with_a_4bit_base_is_refused(tmp_path, tiny_model_dir, capsys):
    from psft_lite.core.errors import RecipeError
    from psft_lite.training.sharding import check_supported

    from conftest import run_cli

    recipe = make_recipe(tmp_path, tiny_model_dir, train={**TRAIN, "strategy": "fsdp"})
    code, _, err = run_cli(capsys, "train", str(recipe))  # one process, no launcher
    assert code == 2, err
    assert "this is one process" in err and "torchrun --nproc_per_node" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()
    bad = make_recipe(tmp_path / "bad", tiny_model_dir, train={**TRAIN, "strategy": "zero3"})
    code, _, err = run_cli(capsys, "train", str(bad))
    assert code == 2 and "train.strategy" in err and "Traceback" not in err
    with pytest.raises(RecipeError, match="load_in_4bit = true"):
        check_supported(True)
