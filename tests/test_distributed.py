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


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, tiny_model_dir) -> dict[str, tuple[Path, Path]]:
    """Each objective's recipe and its one-process reference run, trained once for the module's tests."""
    from rich.console import Console

    from psft_lite.recipe.schema import load_recipe
    from psft_lite.training import trainer

    out = {}
    for name, objective in OBJECTIVES.items():  # in this process (one process is one process; no launcher start-up)
        tmp = tmp_path_factory.mktemp(f"single-{name}")
        recipe = make_recipe(tmp, tiny_model_dir, objective=objective, train=TRAIN)
        trainer.run(load_recipe(recipe, [f"output.dir={tmp / 'one'}"]), console=Console(quiet=True))
        out[name] = (recipe, tmp / "one")
    return out


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


# ---------------------------------------------------------------------------------------------------------------------
# Sharded (train.strategy = "fsdp"): the decoder layers split over the two processes


def adapter_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("objective", ["sft", "psft-base"])
def test_sharded_training_follows_the_single_process_trajectory_and_writes_the_same_adapter(
    tmp_path, single_process, objective, capsys
):
    from test_cli import run_cli

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


def test_sharding_without_a_launcher_or_with_a_4bit_base_is_refused(tmp_path, tiny_model_dir):
    from psft_lite.core.errors import RecipeError
    from psft_lite.training.sharding import check_supported

    recipe = make_recipe(tmp_path, tiny_model_dir, train={**TRAIN, "strategy": "fsdp"})
    p = launch(["train", str(recipe)], 1)
    assert p.returncode == 2, p.stderr
    assert "this is one process" in p.stderr and "torchrun --nproc_per_node" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "run").exists()
    bad = make_recipe(tmp_path / "bad", tiny_model_dir, train={**TRAIN, "strategy": "zero3"})
    p = launch(["train", str(bad)], 1)
    assert p.returncode == 2 and "train.strategy" in p.stderr and "Traceback" not in p.stderr
    with pytest.raises(RecipeError, match="load_in_4bit = true"):
        check_supported(True)
