"""Data-parallel and sharded (FSDP) training under torchrun (gloo, 2 CPU processes): same trajectory as one process,
one set of outputs in the one-process layout, resumable (also with another process count), and a dead rank fails the
run instead of hanging it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_recipe

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
TRAIN = {"max_steps": 4, "batch_size": 4, "micro_batch_size": 1, "lr": 2e-2, "schedule": "constant"}


def launch(args: list[str], procs: int, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = (TORCHRUN if procs == 2 else [sys.executable]) + ["-m", "psft_lite", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def losses(run: Path) -> list[tuple[int, float, float]]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in recs if "event" not in r]


OBJECTIVES = {
    "sft": {"kind": "sft"},
    "psft": {"kind": "psft", "old_policy": "snapshot", "refresh_every": 2},
    "psft-base": {"kind": "psft", "old_policy": "base"},
}
DDP_OBJECTIVES = ["sft", "psft"]


def same_trajectory(a: list, b: list, grad_rtol: float = 1e-4) -> None:
    assert [s for s, _, _ in a] == [s for s, _, _ in b]
    for (s1, l1, g1), (_, l2, g2) in zip(a, b):
        assert abs(l1 - l2) <= 1e-5 * abs(l1) + 1e-7 and abs(g1 - g2) <= grad_rtol * g1, (s1, l1, l2, g1, g2)


def single_runs(tmp_path_factory, tiny_model_dir, names: list[str]) -> dict[str, tuple[Path, Path]]:
    """The named objectives' recipes and one-process reference runs, trained once for the module's tests."""
    from rich.console import Console

    from psft_lite.recipe.schema import load_recipe
    from psft_lite.training import trainer

    out = {}
    for name in names:  # in this process (one process is one process; no launcher start-up)
        tmp = tmp_path_factory.mktemp(f"single-{name}")
        recipe = make_recipe(tmp, tiny_model_dir, objective=OBJECTIVES[name], train=TRAIN)
        trainer.run(load_recipe(recipe, [f"output.dir={tmp / 'one'}"]), console=Console(quiet=True))
        out[name] = (recipe, tmp / "one")
    return out


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, tiny_model_dir) -> dict[str, tuple[Path, Path]]:
    return single_runs(tmp_path_factory, tiny_model_dir, DDP_OBJECTIVES)


@pytest.mark.parametrize("objective", DDP_OBJECTIVES)
def test_two_processes_follow_the_single_process_trajectory(tmp_path, single_process, objective):
    recipe, one = single_process[objective]
    two = tmp_path / "two"
    p2 = launch(["train", str(recipe), "--set", f"output.dir={two}"], 2)
    assert p2.returncode == 0, p2.stderr[-2000:]
    a, b = losses(one), losses(two)
    assert [s for s, _, _ in b] == [1, 2, 3, 4]  # one metrics line per step: only rank 0 writes
    same_trajectory(a, b)
    assert sorted(p.name for p in two.iterdir()) == ["adapter", "checkpoints", "metrics.jsonl", "recipe.toml"]
    assert p2.stdout.count("adapter:") == 1  # one summary, from rank 0
    assert "data-parallel over 2 processes" in p2.stderr


def test_resume_a_two_process_checkpoint_in_one_process(tmp_path, single_process):
    recipe, ref = single_process["psft"]  # the uninterrupted one-process trajectory
    cut = tmp_path / "cut"
    p = launch(["train", str(recipe), "--set", f"output.dir={cut}", "--set", "train.max_steps=2"], 2)
    assert p.returncode == 0, p.stderr[-2000:]
    p = launch(["train", str(cut / "recipe.toml"), "--resume", "--set", "train.max_steps=4"], 1)
    assert p.returncode == 0, p.stderr
    for (s1, l1, _), (s2, l2, _) in zip(losses(ref), losses(cut)):
        assert s1 == s2 and abs(l1 - l2) <= 1e-5 * abs(l1) + 1e-7, (s1, l1, l2)


def test_batch_must_split_into_whole_micro_batches_per_process(tmp_path, tiny_model_dir):
    recipe = make_recipe(tmp_path, tiny_model_dir, train={**TRAIN, "micro_batch_size": 4})
    p = launch(["train", str(recipe)], 2)
    assert p.returncode != 0
    assert "must be a multiple of train.micro_batch_size (4) × the 2 processes" in p.stderr
    assert not (tmp_path / "run").exists()


def test_a_killed_rank_fails_the_run_without_hanging(tmp_path, tiny_model_dir):
    recipe = make_recipe(tmp_path, tiny_model_dir, train={**TRAIN, "max_steps": 2000})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(
        TORCHRUN + ["-m", "psft_lite", "train", str(recipe)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    t0 = time.time()
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert time.time() - t0 < 120 and p.poll() is None
        time.sleep(0.2)
    victim = None
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                env_raw = Path(f"/proc/{pid}/environ").read_bytes()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"LOCAL_RANK=1\x00" in env_raw and b"psft_lite" in cmd and str(recipe).encode() in cmd:
                victim = int(pid)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    out, err = p.communicate(timeout=120)  # the launcher notices and stops the rest: no hang
    assert p.returncode != 0
    assert "rank      : 1" in err and "SIGKILL" in err
