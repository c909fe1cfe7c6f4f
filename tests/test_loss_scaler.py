"""fp16 loss scaling (GPUs without bf16): overflowing steps are the scaler's to skip, not the guard's; the scale is
logged, checkpointed and restored. The GradScaler logic is device-independent, so it runs here on the CPU (fp32
weights, a CPU GradScaler); tests/test_cuda.py runs the real fp16 path on a GPU."""

from __future__ import annotations

import math

import pytest
import torch

from psft_lite.core.errors import Interrupted
from psft_lite.model import scoring
from psft_lite.recipe.schema import load_recipe
from psft_lite.training import trainer
from psft_lite.training.build import build, loss_scaler
from psft_lite.training.loop import train_loop
from psft_lite.training.step import train_step

from conftest import QUIET, make_recipe


def _run(tmp_path, model, scaler, **train_keys):
    recipe = make_recipe(tmp_path, model, train={"max_steps": 4, "lr": 1e-2, "schedule": "constant", **train_keys})
    run = build(load_recipe(recipe), QUIET)
    run.scaler = scaler
    trainer.prepare_run_dir(run)
    return run


def test_only_fp16_gets_a_scaler():
    cpu = torch.device("cpu")
    assert loss_scaler(cpu, torch.float16) is not None
    assert loss_scaler(cpu, torch.bfloat16) is None and loss_scaler(cpu, torch.float32) is None


def test_an_overflowing_step_is_skipped_by_the_scaler_not_counted_by_the_guard(tmp_path, tiny_model_dir):
    # a scale so large that the scaled gradients overflow: each step halves it until they fit
    run = _run(tmp_path, tiny_model_dir, torch.amp.GradScaler("cpu", init_scale=2.0**127), max_steps=3)
    before = [p.detach().clone() for p in scoring.trainable_parameters(run.model)]
    rec = train_step(run, 0)
    assert rec["overflow"] == 1.0 and "skipped" not in rec and not math.isfinite(rec["grad_norm"])
    assert rec["loss_scale"] == 2.0**126
    after = list(scoring.trainable_parameters(run.model))
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # no update on overflow
    assert run.guard.observe(rec, rec.get("skipped")) == []  # no skipped_step event, patience untouched
    assert run.guard.bad == 0


def test_scaled_steps_equal_unscaled_ones_and_the_scale_survives_resume(tmp_path, tiny_model_dir):
    plain = _run(tmp_path / "plain", tiny_model_dir, None)
    expected = train_loop(plain)
    # growth_interval 1: the scale doubles after every finite step, so a resume that lost it would show
    scaled = _run(
        tmp_path / "scaled", tiny_model_dir, torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
    )
    with pytest.raises(Interrupted):
        train_loop(scaled, should_stop=lambda done: done == 2)
    resumed = build(load_recipe(scaled.run_dir / "recipe.toml"), QUIET, resuming=True)
    resumed.scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=1)
    start, _ = trainer.resume_point(resumed, "latest")
    got = train_loop(resumed, start)
    assert [r["loss_scale"] for r in got] == [2.0**11, 2.0**12]
    for e, g in zip(expected[2:], got):  # power-of-two scaling is exact in fp32: the same trajectory
        assert math.isclose(e["loss"], g["loss"], rel_tol=1e-6) and math.isclose(
            e["grad_norm"], g["grad_norm"], rel_tol=1e-5
        )
