"""Several training sources with weights, and self-replay of the base model's own answers (recipe `data.train` as a
list, `data.weights`, `[data.replay]`)."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest

from psft_lite.data.batching import DataPlan, epoch_draws
from psft_lite.recipe.schema import load_recipe
from psft_lite.training import trainer
from psft_lite.training.build import build
from psft_lite.training.loop import train_loop

from conftest import QUIET, ROOT, arith_rows, make_recipe, run_cli, write_jsonl


def test_a_weighted_mix_draws_its_shares_every_epoch_and_in_every_batch():
    """Two sources of 30 and 100 rows at 0.75 / 0.25: an epoch draws 130 examples, 98 and 32 (exact to one example),
    the small source repeated, the large one sub-sampled, each batch within one example of its share."""
    sizes = (30, 100)
    draws = epoch_draws(list(sizes), [0.75, 0.25])
    assert draws == [98, 32]
    plan = DataPlan(sum(sizes), 8, 4, seed=3, sizes=sizes, draws=tuple(draws))
    small: Counter = Counter()
    for epoch in range(3):
        steps = range(epoch * plan.steps_per_epoch, (epoch + 1) * plan.steps_per_epoch)
        idx = [i for s in steps for i in plan.step_indices(s)]
        assert Counter(plan.source_of(i) for i in idx) == {0: 98, 1: 32}
        for s in steps:
            got = sum(plan.source_of(i) == 1 for i in plan.step_indices(s))
            assert abs(got - 0.25 * len(plan.step_indices(s))) <= 1
        small.update(i for i in idx if i < 30)
    assert set(small.values()) <= {9, 10}  # 294 draws from 30 rows: every row used up before any repeats again
    seen = {
        i
        for e in range(3)
        for s in range(e * plan.steps_per_epoch, (e + 1) * plan.steps_per_epoch)
        for i in plan.step_indices(s)
        if i >= 30
    }
    assert len(seen) == 96  # 3 epochs x 32 draws walk through the large source without repeating a row


def test_one_source_keeps_exactly_the_order_it_had():
    import numpy as np

    plan = DataPlan(50, 4, 2, seed=7)
    assert plan.step_indices(0) == np.random.default_rng([7, 0]).permutation(50)[:4].tolist()
    assert plan.epoch_size == 50 and plan.steps_per_epoch == 13


def test_replay_is_its_ratio_of_every_epoch():
    assert epoch_draws([400], None, (530, 0.2)) == [400, 100]  # 100 / 500 = 20 %; the user's rows each seen once
    assert epoch_draws([300, 100], [1, 1], (50, 0.5)) == [200, 200, 400]


def _mixed_recipe(tmp_path: Path, model: Path, **sections) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    other = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in arith_rows(24, "test")
        ],
    )
    data = {
        "train": [str(tmp_path / "train.jsonl"), {"path": str(other), "format": "messages", "limit": 20}],
        "weights": [0.25, 0.75],
        "max_length": 256,
    }
    return make_recipe(tmp_path, model, data=data, **sections)


def test_a_mixed_run_reports_its_sources_and_is_identical_after_a_resume(tmp_path, tiny_model_dir, capsys):
    sections = {"train": {"max_steps": 6, "batch_size": 4, "micro_batch_size": 2, "lr": 2e-2}}
    code, _, err = run_cli(capsys, "train", str(_mixed_recipe(tmp_path / "full", tiny_model_dir, **sections)))
    assert code == 0, err
    assert re.search(r"train\.jsonl: 16 examples, [\d,]+ trained tokens; 25\.0% of the 36 examples drawn", err), err
    assert re.search(r"chat\.jsonl: 20 examples, [\d,]+ trained tokens; 75\.0% of the 36 examples drawn", err), err
    full = [json.loads(x) for x in (tmp_path / "full" / "run" / "metrics.jsonl").read_text().splitlines()]
    cut = build(load_recipe(_mixed_recipe(tmp_path / "cut", tiny_model_dir, **sections)), QUIET)
    trainer.prepare_run_dir(cut)
    with pytest.raises(Exception, match="--resume"):
        train_loop(cut, should_stop=lambda done: done == 2)
    resumed = build(load_recipe(cut.run_dir / "recipe.toml"), QUIET, resuming=True)
    start, _ = trainer.resume_point(resumed, "latest")
    got = train_loop(resumed, start)
    for a, b in zip(full[2:], got):
        assert a["step"] == b["step"] and math.isclose(a["loss"], b["loss"], rel_tol=1e-5, abs_tol=1e-7)
    assert resumed.data.identity()["draws"] == [9, 27]  # the mix is part of what a resume must find unchanged
    code, out, err = run_cli(capsys, "validate", str(tmp_path / "full" / "recipe.toml"))
    assert code == 0 and "chat.jsonl: 20 examples" in out and "75.0% of the examples drawn per epoch" in out


@pytest.mark.parametrize(
    "data, key",
    [
        ({"weights": [1.0]}, "data.weights has 1 value"),
        ({"weights": [0.0, 0.0]}, "positive total"),
        ({"weights": [1.0, -1.0]}, "positive total"),
        ({"replay": {"ratio": 1.0}}, "data.replay.ratio"),
        ({"replay": {"ratio": -0.1}}, "data.replay.ratio"),
        ({"replay": {"ratio": 0.2, "prompts": "missing.jsonl"}}, "data.replay.prompts: missing.jsonl not found"),
        ({"replay": {"ratio": 0.2, "prompts": "EMPTY"}}, "has no prompts"),
    ],
)
def test_bad_mixes_are_refused_before_anything_is_written(tmp_path, tiny_model_dir, capsys, data, key):
    if data.get("replay", {}).get("prompts") == "EMPTY":
        (tmp_path / "empty.jsonl").write_text("\n")
        data = {"replay": {"ratio": 0.2, "prompts": str(tmp_path / "empty.jsonl")}}
    recipe = make_recipe(tmp_path, tiny_model_dir)
    raw = load_recipe(recipe).model_dump(mode="json", exclude_none=True)
    raw["data"]["train"] = [raw["data"]["train"][0]["path"], raw["data"]["train"][0]["path"]]
    raw["data"].update(data)
    import tomli_w

    recipe.write_text(tomli_w.dumps(raw))
    for command in ("validate", "train"):
        code, _, err = run_cli(capsys, command, str(recipe))
        assert code == 2 and key in " ".join(err.split()), err
    assert not (tmp_path / "run").exists()


def test_the_default_replay_pool_shares_no_prompt_with_any_evaluation_set():
    from psft_lite.data.replay_pool import POOL, build
    from psft_lite.inference import retention

    pool = [json.loads(x)["prompt"] for x in POOL.read_text().splitlines()]
    assert len(pool) >= 500 and len(set(pool)) == len(pool)
    assert [r["prompt"] for r in build()] == pool  # the shipped file is what the generator writes

    def norm(s: str) -> str:
        return " ".join(re.sub(r"[^a-z0-9 ]", " ", s.lower()).split())

    evaluation = {norm(it.prompt) for it in retention.load_suite()}
    evaluation |= {norm(r["prompt"]) for r in retention.read_prompts()}
    for path in [*(ROOT / "data").rglob("*.jsonl")]:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if isinstance(row.get("prompt"), str):
                evaluation.add(norm(row["prompt"]))
    assert not {norm(p) for p in pool} & evaluation


@pytest.mark.slow
def test_self_replay_generates_once_caches_and_trains_the_answers_as_assistant_turns(
    tmp_path, embedded_dir, capsys, monkeypatch
):
    """The real embedded model answers four prompts once; a second run reads the cache (no generation); every replay
    example trains exactly the base's answer and its end-of-turn token."""
    from psft_lite.inference import replay

    monkeypatch.setenv("PSFT_LITE_HOME", str(tmp_path / "home"))
    prompts = write_jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": p} for p in ["Say hello.", "Name a fruit.", "What color is the sky?", "Say yes."]],
    )
    sections = {
        "data": {"replay": {"ratio": 0.5, "prompts": str(prompts), "max_new_tokens": 48}},
        "train": {"max_steps": 2, "batch_size": 4, "micro_batch_size": 4},
    }
    code, _, err = run_cli(capsys, "train", str(make_recipe(tmp_path / "a", embedded_dir, **sections)))
    assert code == 0, err
    said = re.search(r"self-replay: the base model's answers to 4 prompts, generated in \d+ s .*; (\d) ended", err)
    assert said, err
    cached = list((tmp_path / "home" / "replay").glob("*.jsonl"))
    rows = [json.loads(x) for x in cached[0].read_text().splitlines()]
    assert len(cached) == 1 and len(rows) == 4 and sum(r["finished"] for r in rows) == int(said[1]) >= 2

    def no_generation(*a, **k):
        raise AssertionError("the cached answers should have been reused")

    monkeypatch.setattr(replay, "generate_answers", no_generation)
    import io

    from rich.console import Console

    said = io.StringIO()
    run = build(load_recipe(make_recipe(tmp_path / "b", embedded_dir, **sections)), Console(file=said, width=300))
    assert f"4 prompts, read from the cache ({cached[0]}); {len(finished_rows(rows))} ended" in said.getvalue()
    replayed = [e for e in run.examples if e.where.startswith("self-replay")]
    finished = finished_rows(rows)
    assert len(replayed) == len(finished)
    tok = run.tokenizer
    for ex, row in zip(replayed, finished):
        trained = tok.decode(ex.ids[ex.mask])
        assert trained == row["completion"] + "<|im_end|>", trained
        assert "Say hello." in tok.decode(ex.ids[~ex.mask]) or row["prompt"] in tok.decode(ex.ids[~ex.mask])


def finished_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["finished"]]


def test_a_base_model_that_rarely_ends_a_turn_replays_its_cut_answers_up_to_the_cut(
    tmp_path, tiny_model_dir, capsys, monkeypatch
):
    """`data.replay.unfinished`: with no finished answer, the default refuses before training and names the key; with
    "train", every cut answer is trained as far as the model wrote it — its own tokens, no end of turn — and a few
    steps train on them."""
    from psft_lite.inference import replay

    monkeypatch.setenv("PSFT_LITE_HOME", str(tmp_path / "home"))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in ["Tell me about rivers.", "Describe a cat."]])
    rows = [
        {
            "prompt": "Tell me about rivers.",
            "completion": "Rivers carry water from the hills to the sea, and",
            "finished": False,
        },
        {
            "prompt": "Describe a cat.",
            "completion": "A cat is a small furry animal with whiskers that",
            "finished": False,
        },
    ]

    def base_answers(loaded, prompts, data, path, console=None):  # the base's answers, as a base model writes them
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return 0.0

    monkeypatch.setattr(replay, "generate_answers", base_answers)
    data = {"replay": {"ratio": 0.25, "prompts": str(prompts), "max_new_tokens": 12}}
    train = {"max_steps": 2, "batch_size": 4, "micro_batch_size": 4}
    code, _, err = run_cli(capsys, "train", str(make_recipe(tmp_path / "a", tiny_model_dir, data=data, train=train)))
    assert code == 2 and 'data.replay.unfinished = "train"' in " ".join(err.split()), err
    assert "Traceback" not in err and not (tmp_path / "a" / "run").exists()

    data["replay"]["unfinished"] = "train"
    recipe = make_recipe(tmp_path / "b", tiny_model_dir, data=data, train=train)
    import io

    from rich.console import Console

    said = io.StringIO()
    run = build(load_recipe(recipe), Console(file=said, width=300))
    assert (
        "0 ended within data.replay.max_new_tokens = 12; the 2 cut by it are trained up to the cut" in said.getvalue()
    )
    replayed = [e for e in run.examples if e.where.startswith("self-replay")]
    assert len(replayed) == 2
    for ex, row in zip(replayed, rows):
        assert run.tokenizer.decode(ex.ids[ex.mask]) == row["completion"]  # no <|im_end|>: the model never wrote it
        assert ex.mask[-1] and ex.ids[-1] not in run.tokenizer.all_special_ids  # nothing after its last own token
    code, _, err = run_cli(capsys, "train", str(recipe))
    assert code == 0, err
    metrics = [json.loads(x) for x in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2] and all(
        math.isfinite(m["loss"]) for m in metrics if "loss" in m
    )


def test_replay_with_nothing_to_train_says_why_without_suggesting_a_setting_already_made(
    tmp_path, tiny_model_dir, capsys, monkeypatch
):
    """With `unfinished = "train"` set, an empty replay can only mean empty answers (or finished ones too long to
    keep): the error says so and does not advise setting what is already set."""
    from psft_lite.inference import replay

    monkeypatch.setenv("PSFT_LITE_HOME", str(tmp_path / "home"))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Say nothing."}, {"prompt": "Be silent."}])

    def empty_answers(loaded, prompts, data, path, console=None):
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"prompt": p, "completion": "", "finished": i == 0} for i, p in enumerate(prompts)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return 0.0

    monkeypatch.setattr(replay, "generate_answers", empty_answers)
    data = {"replay": {"ratio": 0.25, "prompts": str(prompts), "max_new_tokens": 12, "unfinished": "train"}}
    train = {"max_steps": 2, "batch_size": 4, "micro_batch_size": 4}
    code, _, err = run_cli(capsys, "train", str(make_recipe(tmp_path / "a", tiny_model_dir, data=data, train=train)))
    said = " ".join(err.split())
    assert code == 2 and "left anything to train" in said and "data.max_length" in said, err
    assert 'set data.replay.unfinished = "train"' not in said and "Traceback" not in err
    assert not (tmp_path / "a" / "run").exists()
