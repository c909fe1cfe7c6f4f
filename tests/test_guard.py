"""Guard rails: entropy watch, drift watch and the loss watchdog."""

from __future__ import annotations

import json
import math
import re

import pytest

from psft_lite.core.errors import RunError
from psft_lite.recipe.schema import GuardSection, load_recipe
from psft_lite.training import trainer
from psft_lite.training.build import build
from psft_lite.training.guard import ADVICE, DEFAULT_ADVICE, Guard
from psft_lite.training.loop import train_loop
from psft_lite.training.objectives import method_keys, methods

from conftest import QUIET, make_recipe


def rec(step, entropy=1.0, nll=1.0, loss=1.0, drift=None):
    r = {"step": step, "entropy": entropy, "nll": nll, "loss": loss, "grad_norm": 1.0}
    if drift is not None:
        r["drift"] = drift
    return r


def feed(g, records):
    events = []
    for r in records:
        skip = g.check_step(r)
        events += g.observe(r, skip)
    return events


def test_entropy_warning_fires_once_below_the_floor():
    g = Guard(GuardSection(trend_steps=1000), total_steps=100)
    events = feed(g, [rec(s, entropy=1.0) for s in range(1, 4)] + [rec(s, entropy=0.1) for s in range(4, 40)])
    warns = [e for e in events if e["event"] == "entropy_warning"]
    assert len(warns) == 1 and not warns[0]["stop"]
    assert g.baseline == 1.0 and warns[0]["entropy_ema"] < GuardSection().entropy_floor
    assert "sft_kl" in warns[0]["message"] and "of its starting value" in warns[0]["message"]


def test_entropy_trend_warns_before_the_floor_is_reached():
    g = Guard(GuardSection(trend_steps=10, entropy_floor=0.05), total_steps=200)
    ents = [1.0, 1.0, 1.0] + [0.96**i for i in range(1, 80)]  # a steady fall by 4 % per step
    events = feed(g, [rec(s + 1, entropy=e) for s, e in enumerate(ents)])
    (w,) = [e for e in events if e["event"] == "entropy_warning"]
    assert "at its current rate" in w["message"] and w["entropy_ema"] > 0.2


def test_a_plateau_is_not_a_collapse():
    """The shapes docs/study.md measured over 160 steps: psft base drops steeply, then levels off at ~25 % of its
    start (no warning); sft keeps falling by a steady factor (a warning, well before the end)."""

    def events(curve):
        g = Guard(GuardSection(), total_steps=160, method="psft-base")
        return [
            e for e in feed(g, [rec(s, entropy=curve(max(s - 3, 0))) for s in range(1, 161)]) if "entropy" in e["event"]
        ]

    assert events(lambda t: 0.25 + 0.75 * math.exp(-t / 12)) == []
    (w,) = events(lambda t: math.exp(-t / 25))
    assert w["step"] < 80 and "at its current rate" in w["message"]


def test_stable_entropy_never_warns():
    g = Guard(GuardSection(), total_steps=100)
    assert feed(g, [rec(s, entropy=0.8 + 0.05 * (-1) ** s) for s in range(1, 100)]) == []


def test_loss_spike_is_skipped_and_patience_stops():
    g = Guard(GuardSection(warmup_steps=2, patience=3), total_steps=50)
    feed(g, [rec(s, nll=1.0) for s in range(1, 10)])
    assert g.check_step(rec(10, nll=1.2)) is None
    assert "loss spike" in g.check_step(rec(10, nll=9.0))
    events = feed(g, [rec(s, nll=9.0) for s in range(10, 13)])
    assert [e["stop"] for e in events] == [False, False, True]
    assert g.check_step(rec(13, loss=float("nan"))) == "non-finite loss or gradient"


def test_drift_warning_and_stop_action():
    g = Guard(GuardSection(action="stop", drift_max=0.5), total_steps=50)
    spike = feed(g, [rec(1, drift=0.1), rec(2, drift=2.0), rec(3, drift=0.1)])  # one noisy batch: not the model
    assert [e for e in spike if e["event"] == "drift_warning"] == []
    events = feed(g, [rec(s, drift=0.9) for s in range(4, 20)])
    (w,) = [e for e in events if e["event"] == "drift_warning"]
    assert 4 < w["step"] < 20 and w["stop"] and "more likely than the base" in w["message"]
    assert 0.5 < w["drift"] < 0.9  # the running mean, not the last sample


def test_guard_state_survives_a_checkpoint_round_trip():
    g = Guard(GuardSection(), total_steps=100)
    feed(g, [rec(s, entropy=1.0 - 0.01 * s) for s in range(1, 20)])
    h = Guard(GuardSection(), total_steps=100)
    h.load_state_dict(json.loads(json.dumps(g.state_dict())))
    # the restored guard behaves as the original would have: same events on the same continuation
    rest = [rec(s, entropy=max(0.05, 1.0 - 0.04 * s)) for s in range(20, 60)]
    restored = feed(h, rest)
    assert restored and restored == feed(g, rest)  # the continuation warns, and identically after the round trip


def test_drift_is_sampled_and_guard_stop_ends_the_run_with_a_checkpoint(tmp_path, tiny_model_dir):
    r = build(
        load_recipe(
            make_recipe(
                tmp_path,
                tiny_model_dir,
                train={"max_steps": 10, "lr": 5e-2, "schedule": "constant"},
                guard={"drift_every": 2, "drift_max": 0.02, "action": "stop"},
            )
        ),
        QUIET,
    )
    trainer.prepare_run_dir(r)
    with pytest.raises(RunError, match="drifted from the base") as e:
        train_loop(r)
    assert "checkpoint saved to" in str(e.value) and "--set guard.action=warn" in str(e.value)
    lines = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "event" not in x]
    assert "drift" not in steps[0] and "drift" in steps[1]  # sampled every 2 steps
    assert any(x.get("event") == "drift_warning" for x in lines)
    assert (r.run_dir / "checkpoints" / f"step-{steps[-1]['step']}").is_dir()


def test_psft_base_reports_drift_every_step_for_free(tmp_path, tiny_model_dir):
    r = build(
        load_recipe(
            make_recipe(
                tmp_path,
                tiny_model_dir,
                objective={"kind": "psft", "old_policy": "base"},
                train={"max_steps": 2, "lr": 5e-2},
            )
        ),
        QUIET,
    )
    trainer.prepare_run_dir(r)
    recs = train_loop(r)
    assert all(x["drift"] == -x["approx_kl"] for x in recs)


@pytest.mark.parametrize("method", list(methods()))
def test_advice_suggests_only_what_applies_to_the_running_method(method):
    own = methods()[method]
    reads = method_keys(method)
    for event, per_method in ADVICE.items():
        text = per_method.get(method, DEFAULT_ADVICE)  # a method without a row of its own gets the default
        for key, value in re.findall(r"objective\.(\w+)(?: = '(\w+)')?", text):
            if key in ("kind", "old_policy"):  # a switch: never to what is already running
                assert value and value != own.get(key), (event, text)  # e.g. never "try psft" to a psft run
            else:
                assert key in reads, (event, key, text)  # a knob this method actually reads


def test_a_psft_snapshot_run_is_told_about_its_own_knobs():
    g = Guard(GuardSection(trend_steps=1000), total_steps=100, method="psft-snapshot")
    events = [
        ev
        for step, h in enumerate([0.8, 0.8, 0.8] + [0.05] * 30, 1)
        for ev in g.observe({"step": step, "entropy": h, "nll": 1.0, "loss": 1.0, "grad_norm": 1.0}, None)
    ]
    (ev,) = [e for e in events if e["event"] == "entropy_warning"]
    assert "refresh_every" in ev["message"] and "kind = 'sft_kl'" in ev["message"]
    # the benchmark's psft base never learned the taught format: the guard no longer points there
    assert "kind = 'psft'" not in ev["message"] and "old_policy = 'base'" not in ev["message"]
