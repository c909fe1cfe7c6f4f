"""Checkpoints and resume: an interrupted run continues the same trajectory; a killed save corrupts nothing."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from rich.console import Console

from psft_lite.core import rundir
from psft_lite.core.errors import Interrupted, RecipeError, RunError
from psft_lite.core.rundir import list_checkpoints
from psft_lite.recipe.schema import load_recipe
from psft_lite.training import trainer
from psft_lite.training.build import build
from psft_lite.training.loop import train_loop

from conftest import QUIET, make_recipe, run_cli

CASES = {
    "sft": {"objective": {"kind": "sft"}, "lora": {"dropout": 0.1}},  # dropout: the torch RNG must be restored
    "psft-snapshot": {
        "objective": {"kind": "psft", "old_policy": "snapshot", "refresh_every": 4}
    },  # stop mid-group: the cache is restored
    "psft-base": {"objective": {"kind": "psft", "old_policy": "base"}},
}


def _steps(recs):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in recs]


@pytest.mark.parametrize("case", list(CASES))
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, tiny_model_dir, case):
    sections = {**CASES[case], "train": {"max_steps": 7, "batch_size": 4, "micro_batch_size": 2, "lr": 2e-2}}
    # uninterrupted
    full = build(load_recipe(make_recipe(tmp_path / "full", tiny_model_dir, **sections)), QUIET)
    trainer.prepare_run_dir(full)
    expected = _steps(train_loop(full))
    # interrupted after step 2, then resumed by a fresh process-like build from the run's own recipe
    recipe_path = make_recipe(tmp_path / "cut", tiny_model_dir, **sections)
    cut = build(load_recipe(recipe_path), QUIET)
    trainer.prepare_run_dir(cut)
    with pytest.raises(Interrupted, match="--resume"):
        train_loop(cut, should_stop=lambda done: done == 2)
    assert [s for s, _ in list_checkpoints(cut.run_dir)] == [2]
    resumed = build(load_recipe(cut.run_dir / "recipe.toml"), QUIET, resuming=True)
    start, _ = trainer.resume_point(resumed, "latest")
    assert start == 2
    got = _steps(train_loop(resumed, start))
    assert len(got) == 5
    for (s1, l1, g1), (s2, l2, g2) in zip(expected[2:], got):
        assert s1 == s2 and math.isclose(l1, l2, rel_tol=1e-5, abs_tol=1e-7) and math.isclose(g1, g2, rel_tol=1e-5)
    steps = [json.loads(x)["step"] for x in (cut.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 8))  # one record per step, none duplicated by the resume


def test_resume_refuses_a_recipe_that_changes_the_math(tmp_path, tiny_model_dir):
    path = make_recipe(tmp_path, tiny_model_dir, train={"max_steps": 2})
    r = build(load_recipe(path), QUIET)
    trainer.prepare_run_dir(r)
    train_loop(r)
    changed = build(load_recipe(path, ["lora.r=4", "train.max_steps=4"]), QUIET, resuming=True)
    with pytest.raises(RecipeError, match=r"trained with lora.r = 8, but the recipe now says 4"):
        trainer.resume_point(changed, "latest")
    longer = build(load_recipe(path, ["train.max_steps=4"]), QUIET, resuming=True)
    assert trainer.resume_point(longer, "latest")[0] == 2  # extending a finished run is allowed
    same = build(load_recipe(path), QUIET, resuming=True)
    with pytest.raises(RecipeError, match="raise train.max_steps"):
        trainer.resume_point(same, "latest")


def test_a_resume_that_changes_the_schedule_says_exactly_what_changes_or_is_refused(tmp_path, tiny_model_dir, capsys):
    """Resuming a cosine run with more epochs changes the learning rate of every remaining step: the resume says the
    lr it will use and the one the original run had, and where the decay now ends; a constant schedule past its
    warm-up says nothing (nothing changes); a change of batch size or warm-up is refused, naming the key."""

    from psft_lite.training.schedules import lr_at

    path = make_recipe(tmp_path, tiny_model_dir, train={"epochs": 1, "schedule": "cosine", "warmup_steps": 1})
    import tomli_w
    import tomllib

    raw = tomllib.loads(path.read_text())
    raw["train"].pop("max_steps", None)
    path.write_text(tomli_w.dumps(raw))
    r = build(load_recipe(path), QUIET)
    trainer.prepare_run_dir(r)
    train_loop(r)  # 16 examples, batch 4: 4 steps
    console = Console(file=None, record=True, width=200)
    longer = build(load_recipe(path, ["train.epochs=2"]), console, resuming=True)
    assert trainer.resume_point(longer, "latest")[0] == 4
    said = console.export_text()
    t = longer.recipe.train
    assert (
        f"the run now has 8 steps instead of 4, so its cosine learning-rate schedule changes: from step 5 the lr is "
        f"{lr_at(4, 8, t):.3g} (the original run had {lr_at(4, 4, t):.3g}), and it decays to its floor at step 8 "
        "instead of 4" in " ".join(said.split())
    )
    for key, value in (("train.batch_size", 8), ("train.warmup_steps", 2)):
        other = build(load_recipe(path, ["train.epochs=2", f"{key}={value}"]), QUIET, resuming=True)
        with pytest.raises(RecipeError, match=rf"trained with {key} = "):
            trainer.resume_point(other, "latest")
    flat = make_recipe(tmp_path / "flat", tiny_model_dir, train={"max_steps": 4, "schedule": "constant"})
    r = build(load_recipe(flat), QUIET)
    trainer.prepare_run_dir(r)
    train_loop(r)
    console = Console(file=None, record=True, width=200)
    more = build(load_recipe(flat, ["train.max_steps=6"]), console, resuming=True)
    assert trainer.resume_point(more, "latest")[0] == 4 and "schedule changes" not in console.export_text()


def test_keep_last_prunes_old_checkpoints(tmp_path, tiny_model_dir):
    r = build(
        load_recipe(make_recipe(tmp_path, tiny_model_dir, train={"max_steps": 5, "save_every": 1, "keep_last": 2})),
        QUIET,
    )
    trainer.prepare_run_dir(r)
    train_loop(r)
    assert [s for s, _ in list_checkpoints(r.run_dir)] == [4, 5]


def test_a_failed_checkpoint_write_stops_cleanly_and_keeps_the_last_good_one(tmp_path, tiny_model_dir, monkeypatch):
    import errno

    import psft_lite.training.checkpoint as ckpt

    r = build(load_recipe(make_recipe(tmp_path, tiny_model_dir, train={"max_steps": 4, "save_every": 2})), QUIET)
    trainer.prepare_run_dir(r)
    real_save, calls = ckpt.torch.save, []

    def disk_full_on_second_checkpoint(obj, path, *a, **kw):
        calls.append(path)
        if "step-4" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(ckpt.torch, "save", disk_full_on_second_checkpoint)
    with pytest.raises(RunError, match=r"step-4 .*No space left on device.*step-2, is intact.*--resume"):
        train_loop(r)
    assert sorted(p.name for p in (r.run_dir / "checkpoints").iterdir()) == ["step-2"]  # no half-written folder
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    r2 = build(load_recipe(r.run_dir / "recipe.toml"), QUIET, resuming=True)
    assert trainer.resume_point(r2, "latest")[0] == 2


def test_too_little_disk_is_refused_before_training(tmp_path, tiny_model_dir, monkeypatch):
    from collections import namedtuple

    r = build(load_recipe(make_recipe(tmp_path, tiny_model_dir)), QUIET)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: usage(2**30, 2**30 - 2**20, 2**20))
    with pytest.raises(RecipeError, match=r"1 MB free.*lower train.keep_last"):
        trainer.prepare_run_dir(r)
    assert not r.run_dir.exists()  # nothing left behind that looks like a run


def _cli(*args, env=None, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "psft_lite", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        **kw,
    )


def _wait_for(predicate, timeout=120):
    t0 = time.time()
    while not predicate():
        if time.time() - t0 > timeout:
            raise TimeoutError
        time.sleep(0.1)


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_and_resume_finishes(tmp_path, tiny_model_dir, capsys):
    recipe = make_recipe(tmp_path, tiny_model_dir, train={"max_steps": 400, "batch_size": 4, "micro_batch_size": 4})
    metrics = tmp_path / "run" / "metrics.jsonl"
    p = _cli("train", str(recipe))
    _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Resume with:" in err and "Traceback" not in err
    ((step, _),) = list_checkpoints(tmp_path / "run")
    assert step >= 2
    # the resume in this process: the interrupt is what needed a process of its own
    code, out, err = run_cli(
        capsys, "train", str(tmp_path / "run" / "recipe.toml"), "--resume", "--set", f"train.max_steps={step + 2}"
    )
    assert code == 0, err
    assert f"resuming at step {step}" in err
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == list(range(1, step + 3))


KILL_DURING_SAVE = textwrap.dedent(
    """
    import pathlib, sys, time, torch
    import psft_lite.training.checkpoint as ck
    marker, recipe = sys.argv[1], sys.argv[2]
    real_save = torch.save
    def slow_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        if "step-3.tmp-" in str(f) and str(f).endswith("optimizer.pt"):
            pathlib.Path(marker).touch()   # half-written checkpoint on disk: kill me now
            time.sleep(600)
    ck.torch.save = slow_save
    sys.argv = ["psft-lite", "train", recipe]
    from psft_lite.cli import main
    main()
    """
)


@pytest.mark.slow
def test_kill_9_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path, tiny_model_dir):
    recipe = make_recipe(tmp_path, tiny_model_dir, train={"max_steps": 6, "save_every": 1, "keep_last": 5})
    marker = tmp_path / "saving"
    p = subprocess.Popen(
        [sys.executable, "-c", KILL_DURING_SAVE, str(marker), str(recipe)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(marker.exists)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    ckroot = tmp_path / "run" / "checkpoints"
    assert any(".tmp-" in x.name for x in ckroot.iterdir())  # the torn save is there ...
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [1, 2]  # ... and is not taken for a checkpoint
    r = build(load_recipe(tmp_path / "run" / "recipe.toml"), QUIET, resuming=True)
    start, _ = trainer.resume_point(r, "latest")
    assert start == 2
    train_loop(r, start)
    assert [s for s, _ in list_checkpoints(r.run_dir)] == [1, 2, 3, 4, 5, 6][-5:]
    assert not any(".tmp-" in x.name for x in ckroot.iterdir())  # leftovers cleaned by the next save
