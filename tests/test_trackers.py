"""Trackers (output.report_to): what a real run reports is read back with each tracker's own reader and equals
metrics.jsonl; a resumed run reports each step once; a missing extra is exit 2 before loading; a failing tracker never
stops training."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from psft_lite.core import extras
from psft_lite.tracking import trackers

import tracker_readers as read
from conftest import ROOT, arith_rows, make_recipe, run_cli, write_jsonl

BACKENDS = list(trackers.BACKENDS)
TRAJECTORY = ["loss", "nll", "entropy", "grad_norm", "lr", "clip_frac", "ratio_mean", "approx_kl"]
TIMING = ["tokens_per_s", "step_s", "peak_mem_mb"]  # measured again when a resumed run replays a step


def _train(recipe: Path, *args: str) -> subprocess.CompletedProcess:
    """`psft-lite train` in its own process, as a user runs it (trackers keep process-wide state)."""
    p = subprocess.run(
        [sys.executable, "-m", "psft_lite", "train", str(recipe), *args], capture_output=True, text=True, cwd=ROOT
    )
    assert p.returncode == 0, p.stderr
    return p


def _recipe(tmp_path: Path, model: Path, **train) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    held_out = write_jsonl(tmp_path / "eval.jsonl", arith_rows(16, "test"))  # all 200 doubled a run's time
    return make_recipe(
        tmp_path,
        model,
        objective={"kind": "psft", "old_policy": "snapshot", "refresh_every": 2},
        train={"max_steps": 6, "schedule": "constant", "save_every": 2, "keep_last": 0, **train},
        eval={"every": 3, "samples": 2, "max_new_tokens": 4},
        data={"eval": str(held_out), "limit": 16},
        output={"report_to": BACKENDS},
    )


def _metrics(run: Path) -> tuple[dict[int, dict], list[dict]]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "event" not in r}, [r for r in records if r.get("event") == "eval"]


READERS = {"tensorboard": read.tensorboard, "wandb": read.wandb, "mlflow": read.mlflow, "trackio": read.trackio}


def _read_all(run: Path) -> dict[str, tuple]:
    """What each tracker holds, read back with its own reader: (points by key, ...) per backend."""
    return {name: READERS[name](run) for name in BACKENDS}


def _assert_same_as_metrics(points: dict, metrics: tuple[dict, list], timing: bool = True) -> None:
    """Every step exactly once under every key, and the same values as metrics.jsonl (timings too, unless the run was
    resumed: the replayed steps were timed twice and a tracker keeps the first)."""
    steps, evals = metrics
    assert evals, "the recipe evaluates at steps 3 and 6"
    for key in TRAJECTORY + TIMING:
        got = points[key]
        assert [s for s, _ in got] == sorted(steps), f"{key}: steps {[s for s, _ in got]}"
        for s, v in got:
            assert _close(v, steps[s][key]) or (key in TIMING and not timing), (key, s, v, steps[s][key])
    for key in ("eval_loss", "eval_accuracy"):
        assert [s for s, _ in points[key]] == [e["step"] for e in evals]
        assert all(_close(v, e[key]) for (_, v), e in zip(points[key], evals)), (points[key], evals)


def _close(got: float, written: float) -> bool:
    return math.isclose(got, written, rel_tol=1e-5, abs_tol=1e-9)  # metrics.jsonl keeps 6 significant digits


@pytest.fixture(scope="module")
def reported(tmp_path_factory, tiny_model_dir) -> dict:
    """6 psft steps with an eval at steps 3 and 6, reporting to all four trackers, read back at once: the resume
    test then continues this same run (one training run for the module, not two)."""
    tmp = tmp_path_factory.mktemp("reported")
    p = _train(_recipe(tmp, tiny_model_dir))
    run = tmp / "run"
    for name in BACKENDS:
        assert f"{name}" in p.stdout  # where to look, one line per tracker
    assert "warning" not in p.stderr.lower(), p.stderr
    return {"run": run, "read": _read_all(run), "metrics": _metrics(run)}


@pytest.fixture(scope="module")
def resumed_run(reported) -> Path:
    """The reported run as kill -9 after step 6 would leave it (metrics.jsonl and the trackers went further than the
    last checkpoint, step 2), then resumed with --resume."""
    run = reported["run"]
    for name in ("step-4", "step-6"):
        shutil.rmtree(run / "checkpoints" / name)
    shutil.rmtree(run / "adapter")
    p = _train(run / "recipe.toml", "--resume")
    assert "resuming at step 2" in p.stderr
    return run


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_tracker_gets_every_metrics_record(reported, backend):
    _assert_same_as_metrics(reported["read"][backend][0], reported["metrics"])


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_reports_each_step_once_into_the_same_tracker_run(resumed_run, backend):
    got = READERS[backend](resumed_run)
    _assert_same_as_metrics(got[0], _metrics(resumed_run), timing=backend == "tensorboard")
    state = json.loads((resumed_run / "trackers.json").read_text())
    if backend == "wandb":
        _, _, ids = got
        assert ids == [state["wandb"]["id"]] * 2  # two offline segments of one W&B run
    if backend == "mlflow":
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=state["mlflow"]["tracking_uri"])
        exp = client.get_experiment_by_name("psft-lite")
        assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [state["mlflow"]["run_id"]]


@pytest.mark.slow
def test_trackers_get_the_recipe_data_statistics_and_summary(reported):
    got = reported["read"]
    _, config, _ = got["wandb"]
    assert config["objective.kind"] == "psft" and config["train.max_steps"] == 6
    assert config["data.examples"] == 16 and config["data.trained_tokens"] > 0
    _, params, tags, status = got["mlflow"]
    assert params["objective.refresh_every"] == "2" and status == "FINISHED"
    assert tags["summary.adapter"].endswith("adapter")
    points, _ = got["trackio"]
    steps, _ = reported["metrics"]
    assert points["summary/final_nll"] == [(6, pytest.approx(steps[6]["nll"], rel=1e-5))]
    _, texts = got["tensorboard"]
    assert "objective.kind = psft" in texts["recipe"][0][1] and "final_nll" in texts["summary"][0][1]


def test_events_become_markers_and_text(tmp_path):
    calls = []

    class Fake:
        name = "fake"
        replays_resumed_steps = False

        def scalars(self, values, step):
            calls.append(("scalars", values, step))

        def text(self, tag, message, step):
            calls.append(("text", tag, message, step))

    r = trackers.Reporter([Fake()], warn=print)
    r.record({"step": 3, "loss": 1.5, "skipped": "loss is nan", "lr": 1e-3})
    r.record({"event": "skipped_step", "step": 3, "reason": "nan", "stop": False, "message": "step 3: skipped"})
    r.record({"event": "eval", "step": 4, "eval_loss": 0.5})
    assert calls == [
        ("scalars", {"loss": 1.5, "lr": 1e-3}, 3),
        ("scalars", {"events/skipped_step": 1.0}, 3),
        ("text", "skipped_step", "step 3: skipped", 3),
        ("scalars", {"eval_loss": 0.5}, 4),
    ]


def test_a_resumed_reporter_skips_what_was_already_sent_except_to_tensorboard():
    got = []

    class Fake:  # a backend that continues its run (W&B-like) and one that replays resumed steps (TensorBoard-like)
        def __init__(self, name):
            self.name = name
            self.replays_resumed_steps = name == "tensorboard"

        def scalars(self, values, step):
            got.append((self.name, step))

    r = trackers.Reporter([Fake("wandb"), Fake("tensorboard")], warn=print, reported_through=4)
    for step in (3, 4, 5):
        r.record({"step": step, "loss": 1.0})
    assert got == [("tensorboard", 3), ("tensorboard", 4), ("wandb", 5), ("tensorboard", 5)]


def test_a_failing_tracker_is_reported_once_and_training_finishes(tmp_path, tiny_model_dir, monkeypatch):
    from rich.console import Console

    from psft_lite.recipe.schema import load_recipe
    from psft_lite.training import trainer

    def disk_full(self, values, step):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trackers.TensorBoard, "scalars", disk_full)
    recipe = make_recipe(tmp_path, tiny_model_dir, train={"max_steps": 3}, output={"report_to": ["tensorboard"]})
    console = Console(record=True, width=200)
    summary = trainer.run(load_recipe(recipe), console=console)
    text = console.export_text()
    assert text.count("reporting to tensorboard failed (OSError: [Errno 28] No space left on device)") == 1
    assert "metrics.jsonl stays complete" in text
    assert summary.steps == 3 and (summary.adapter / "adapter_config.json").is_file()
    assert [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.mark.parametrize("command", ["validate", "train"])
def test_missing_tracker_package_is_exit_2_before_any_model_loads(
    tmp_path, tiny_model_dir, capsys, monkeypatch, command
):
    from psft_lite.model import loading

    monkeypatch.setattr(extras, "installed", lambda module: module != "wandb")
    monkeypatch.setattr(loading, "load_base_model", lambda *a, **k: pytest.fail("loaded a model"))
    recipe = make_recipe(tmp_path, tiny_model_dir)
    code, out, err = run_cli(capsys, command, str(recipe), "--set", 'output.report_to=["tensorboard", "wandb"]')
    assert code == 2
    assert "output.report_to names wandb" in err and "pip install 'psft-lite[wandb]'" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 4
    assert not (tmp_path / "run").exists()


def test_report_to_from_the_command_line_and_bad_names(tmp_path, tiny_model_dir, capsys):
    from psft_lite.recipe.schema import load_recipe

    recipe = make_recipe(tmp_path, tiny_model_dir)
    assert load_recipe(recipe, ["output.report_to=tensorboard,mlflow"]).output.report_to == ["tensorboard", "mlflow"]
    assert load_recipe(recipe, ["output.report_to=none"]).output.report_to == []
    code, _, err = run_cli(capsys, "train", str(recipe), "--report-to", "tensorbord")
    assert code == 2 and "output.report_to" in err and "tensorboard" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
