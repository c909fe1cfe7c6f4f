"""`psft-lite study` end to end on the tiny model: results per epoch, resumable, tables and figures."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest

from psft_lite.core.errors import RecipeError
from psft_lite.recipe.schema import load_recipe
from psft_lite.study.runner import grid, latest_results, parse_sweep, plot_study, report_tables, run_study
from psft_lite.tracking.metrics import read_metrics

from conftest import QUIET, arith_rows, make_recipe, write_jsonl


def test_study_evaluates_every_epoch_resumes_and_reports(tmp_path, tiny_model_dir, monkeypatch):
    """Every epoch end and every `train.save_at` step is evaluated once, with the general-ability suite item by item
    (here every 60th item, for time) and every answer written beside the results; a rerun does nothing."""
    from psft_lite.inference import retention

    monkeypatch.setenv("PSFT_LITE_HOME", str(tmp_path / "home"))
    suite = retention.load_suite()[::60]
    monkeypatch.setattr(retention, "load_suite", lambda path=None, kinds=(): suite)
    probe = write_jsonl(
        tmp_path / "probe.jsonl",
        [
            {
                "prompt": "What is the capital of France?",
                "completion": "Paris.",
                "answer": "Paris",
                "match": "contains",
            },
            {"prompt": "What is the capital of Italy?", "completion": "Rome.", "answer": "Rome", "match": "contains"},
        ],
    )
    test = write_jsonl(tmp_path / "test.jsonl", arith_rows(3, "test"))
    path = make_recipe(
        tmp_path,
        tiny_model_dir,
        train={"epochs": 2, "lr": 5e-3, "save_at": [1]},
        eval={"sets": {"in_domain": str(test), "probe": str(probe)}},
    )
    recipe = load_recipe(path, ["train.max_steps=", "data.limit=8"])  # whole epochs of 2 optimizer steps
    out = tmp_path / "study"

    results_path = run_study(recipe, ["sft", "psft-base"], [0], out, limit=3, max_new_tokens=4, console=QUIET)
    results = read_metrics(results_path)
    assert sorted((r["method"], r["epoch"], r["step"]) for r in results) == [
        ("base", 0, 0),
        ("psft-base", 0.5, 1),
        ("psft-base", 1, 2),
        ("psft-base", 2, 4),
        ("sft", 0.5, 1),
        ("sft", 1, 2),
        ("sft", 2, 4),
    ]
    assert all(len(r["general"]["right"]) == len(suite) for r in results)
    assert all(r["eval_seconds"]["sets"] > 0 and r["eval_seconds"]["general"] > 0 for r in results)
    assert sorted(p.name for p in (out / "evals").glob("*.gz"))[:2] == [
        "base-step0.jsonl.gz",
        "psft-base-s0-step1.jsonl.gz",
    ]
    base = next(r for r in results if r["method"] == "base")
    sft2 = next(r for r in results if r["method"] == "sft" and r["epoch"] == 2)
    assert base["probe"]["kl_to_base"] == 0.0 and sft2["probe"]["kl_to_base"] > 0  # the adapter moved the model
    assert sft2["probe"]["mean_nll"] != base["probe"]["mean_nll"]
    assert "mean_nll" not in sft2["in_domain"]  # a teacher-forced pass the report never reads: skipped
    assert sft2["train_entropy"] is not None and sft2["in_domain"]["n"] == 3

    run_study(recipe, ["sft", "psft-base"], [0], out, limit=3, max_new_tokens=4, console=QUIET)  # all done: no-op
    assert len(read_metrics(results_path)) == len(results)

    tables = report_tables(results, ["in_domain", "probe"])
    assert "#### Epoch 1" in tables and "#### Epoch 2" in tables and "| psft-base |" in tables
    pngs = plot_study(results, tmp_path / "report", out, ["in_domain", "probe"])
    assert [p.name for p in pngs] == ["study-entropy.png", "study-accuracy.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_sweep_parsing_names_what_is_wrong():
    assert parse_sweep(["train.lr=1e-4,3e-4", "objective.refresh_every=4,16"]) == [
        (("train.lr",), [(1e-4,), (3e-4,)]),
        (("objective.refresh_every",), [(4,), (16,)]),
    ]
    assert parse_sweep(["train.lr:train.epochs=1e-4:12,1e-3:4"]) == [
        (("train.lr", "train.epochs"), [(1e-4, 12), (1e-3, 4)])
    ]
    for bad, says in [
        ("lr=1e-4", "expected SECTION.KEY=V1,V2"),
        ("train.lr=", "no values"),
        ("train.lr:train.epochs=1e-4", "1 value(s) for 2 key(s)"),
        ("objective.kind=sft,psft", "with --methods"),
        ("data.train=a/train.jsonl,b/train.jsonl", "two values would be labelled 'train'"),
    ]:
        with pytest.raises(RecipeError, match=re.escape(says)):
            parse_sweep([bad])
    with pytest.raises(RecipeError, match="swept twice"):
        parse_sweep(["train.lr=1e-4", "train.lr:train.epochs=1e-3:4"])


def test_grid_crosses_a_key_only_with_the_methods_that_read_it():
    sweep = parse_sweep(["train.lr=1e-4,1e-3", "objective.refresh_every=4,16"])
    labels = {m: [c.label for c in grid(sweep, m)] for m in ("sft", "psft-snapshot", "psft-base")}
    assert labels["sft"] == ["lr=0.0001", "lr=0.001"]  # K does not change sft: not trained twice
    assert labels["psft-base"] == ["lr=0.0001", "lr=0.001"]  # the base never refreshes
    assert labels["psft-snapshot"] == [
        "lr=0.0001 refresh_every=4",
        "lr=0.0001 refresh_every=16",
        "lr=0.001 refresh_every=4",
        "lr=0.001 refresh_every=16",
    ]
    assert grid(sweep, "psft-snapshot")[0].run_name("psft-snapshot", 1) == "psft-snapshot-lr=0.0001,refresh_every=4-s1"
    # a data file swept (e.g. hinted rewrites against the originals) is named by its stem: a run name stays one folder
    (cell,) = grid(parse_sweep(["data.train=data/arith/format_train_hinted.jsonl"]), "idft")
    assert cell.label == "train=format_train_hinted" and cell.run_name("idft", 0) == "idft-train=format_train_hinted-s0"


def test_bad_sweep_keys_and_values_fail_before_training(tmp_path, tiny_model_dir):
    recipe = load_recipe(
        make_recipe(
            tmp_path, tiny_model_dir, train={"epochs": 1}, eval={"sets": {"in_domain": str(tmp_path / "train.jsonl")}}
        ),
        ["train.max_steps="],
    )
    for bad, says in [
        ("trian.lr=1e-3", "trian: unknown key (did you mean 'train'?)"),
        ("train.lr=-1", "train.lr: input should be greater than 0"),
    ]:
        with pytest.raises(RecipeError, match=re.escape(says)):
            run_study(recipe, ["sft"], [0], tmp_path / "s", 2, 4, QUIET, sweep=parse_sweep([bad]))
        assert not (tmp_path / "s").exists()  # nothing trained, nothing written


@pytest.mark.slow
def test_sweep_resumes_skipping_finished_cells_and_reports_per_cell(tmp_path, tiny_model_dir):
    test = write_jsonl(tmp_path / "test.jsonl", arith_rows(2, "test"))
    probe = write_jsonl(
        tmp_path / "probe.jsonl",
        [{"prompt": "What is the capital of France?", "completion": "Paris.", "answer": "Paris", "match": "contains"}],
    )
    path = make_recipe(
        tmp_path,
        tiny_model_dir,
        train={"epochs": 2, "lr": 5e-3},
        eval={"sets": {"in_domain": str(test), "probe": str(probe)}, "retention": False},
    )
    recipe = load_recipe(path, ["train.max_steps=", "data.limit=8"])
    out = tmp_path / "sweep"
    first = parse_sweep(["train.lr=5e-3", "objective.refresh_every=2"])
    run_study(recipe, ["sft", "psft-snapshot"], [0], out, 2, 4, QUIET, sweep=first, eval_every=2)
    done = out / "sft-lr=0.005-s0" / "metrics.jsonl"
    before = done.read_text()
    both = parse_sweep(["train.lr=5e-3,1e-2", "objective.refresh_every=2"])
    run_study(recipe, ["sft", "psft-snapshot"], [0], out, 2, 4, QUIET, sweep=both, eval_every=2)
    assert done.read_text() == before  # the finished cell was not trained again
    results = latest_results(read_metrics(out / "results.jsonl"))
    got = sorted((r["method"], r["cell_label"], r["epoch"]) for r in results)
    assert got == [
        ("base", "", 0),
        ("psft-snapshot", "lr=0.005 refresh_every=2", 2),
        ("psft-snapshot", "lr=0.01 refresh_every=2", 2),
        ("sft", "lr=0.005", 2),
        ("sft", "lr=0.01", 2),
    ]
    snap = next(r for r in results if r["method"] == "psft-snapshot" and r["cell"]["train.lr"] == 0.01)
    assert snap["clip_frac"] is not None and snap["train_nll"] > 0 and snap["cell"]["objective.refresh_every"] == 2
    tables = report_tables(results, ["in_domain", "probe"])
    assert "| sft | lr=0.01 | 2 |" in tables and "| psft-snapshot | lr=0.005 refresh_every=2 | 2 |" in tables
    pngs = plot_study(results, tmp_path / "report", out, ["in_domain", "probe"])
    assert [p.name for p in pngs] == ["study-entropy.png", "study-entropy-vs-nll.png", "study-tradeoff.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)


@pytest.mark.slow
def test_an_interrupted_study_resumes_its_run_and_evaluates_each_epoch_once(tmp_path, tiny_model_dir, monkeypatch):
    """Ctrl-C in the middle of a run's second epoch: the rerun resumes that run from its checkpoint (no step trained
    twice or skipped) and evaluates each epoch once."""
    from psft_lite.core.errors import Interrupted
    from psft_lite.training import trainer
    from psft_lite.training.loop import train_loop

    test = write_jsonl(tmp_path / "test.jsonl", arith_rows(2, "test"))
    path = make_recipe(
        tmp_path, tiny_model_dir, train={"epochs": 2}, eval={"sets": {"in_domain": str(test)}, "retention": False}
    )
    recipe = load_recipe(path, ["train.max_steps=", "data.limit=8", "train.save_every=1"])
    out = tmp_path / "study"
    monkeypatch.setattr(trainer, "train_loop", lambda run, start=0, **k: train_loop(run, start, lambda d: d == 3, **k))
    with pytest.raises(Interrupted):
        run_study(recipe, ["sft"], [0], out, limit=2, max_new_tokens=4, console=QUIET)
    monkeypatch.undo()
    results = read_metrics(run_study(recipe, ["sft"], [0], out, limit=2, max_new_tokens=4, console=QUIET))
    assert sorted((r["method"], r["epoch"]) for r in results) == [("base", 0), ("sft", 1), ("sft", 2)]
    steps = [r["step"] for r in read_metrics(out / "sft-s0" / "metrics.jsonl") if "event" not in r]
    assert steps == [1, 2, 3, 4]


def test_the_retention_prompts_are_many_kinds_and_their_checkable_answers_score():
    from collections import Counter

    from psft_lite.inference.evaluate import EvalItem
    from psft_lite.study.benchmark import PROMPTS, read_prompts

    from conftest import ROOT

    rows = read_prompts(ROOT / PROMPTS)
    kinds = Counter(r["kind"] for r in rows)
    assert len(rows) >= 300 and len({r["id"] for r in rows}) == len(rows) and len({r["prompt"] for r in rows}) == 300
    assert len(kinds) >= 6 and min(kinds.values()) >= 10, kinds
    checkable = [r for r in rows if "answer" in r]
    assert len(checkable) >= 60 and all(r["match"] == "contains" for r in checkable)
    for r in checkable:
        item = EvalItem([], "", r["answer"], r["id"], "contains")
        first = r["answer"].split("|")[0]
        assert item.correct(f"I think it is {first}.")[1], r
        assert not item.correct("I am not sure about that one.")[1], r
    paris = EvalItem([], "", "Paris", "x", "contains")
    assert paris.correct("The capital is Paris.")[1] and not paris.correct("Comparison of capitals")[1]


def test_base_answers_keep_each_prompt_and_score_the_checkable_ones(tiny_model_dir):
    from psft_lite.study.benchmark import base_answers

    prompts = [
        {
            "id": "fact-001",
            "kind": "fact",
            "prompt": "What is the capital of France?",
            "answer": "Paris",
            "match": "contains",
        },
        {"id": "code-001", "kind": "code", "prompt": "Write a Python function that reverses a string."},
    ]
    prompts[0]["match"] = "contains"
    rows = base_answers(str(tiny_model_dir), prompts, max_new_tokens=4, batch_size=2)
    assert [r["id"] for r in rows] == ["fact-001", "code-001"]
    assert isinstance(rows[0]["base_correct"], bool) and "base_correct" not in rows[1]
    assert all(isinstance(r["completion"], str) and isinstance(r["finished"], bool) for r in rows)


# ---------------------------------------------------------------------------------------------------------------------
# The benchmark report (psft_lite.study.report)


def _bench_rec(method, seed, epoch, correct, kl_rows, **more):
    rec = {"method": method, "cell": {}, "cell_label": "", "seed": seed, "epoch": epoch, "step": epoch * 10}
    rec["in_domain"] = {"correct": correct, "format_used": correct, "answer_right": correct}
    rec["ood"] = {"correct": correct}
    rec["retention"] = {"correct": "11", "kl_rows": kl_rows}
    return {**rec, **more}


def _rec(method, seed, step, acc, general, transfer="00", kl_rows=((0.0, 4), (0.0, 6)), **more):
    rec = {"method": method, "cell": {}, "cell_label": "", "seed": seed, "epoch": step / 100, "step": step}
    rec["in_domain"] = {"correct": acc, "format_used": acc, "answer_right": acc}
    rec["transfer"] = {"correct": transfer}
    rec["general"] = {"right": general}
    rec["retention"] = {"kl_rows": [list(r) for r in kl_rows]}
    return {**rec, **more}


def test_report_reads_hand_written_records_exactly(tmp_path):
    """Levels and changes are seed means of the observed values; the change in general ability is paired with the
    base item by item; units' records are read with the folder's own; a later record of the same point wins."""
    from psft_lite.study import curves as cv
    from psft_lite.study import report

    base = _rec("base", 0, 0, "0000", "11110000")
    unit = tmp_path / "units" / "sft-s1"
    unit.mkdir(parents=True)
    (tmp_path / "results.jsonl").write_text(
        "\n".join(json.dumps(r) for r in [base, _rec("sft", 0, 25, "1100", "11100000", train_entropy=0.5)]) + "\n"
    )
    (unit / "results.jsonl").write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                _rec("sft", 1, 25, "0000", "00000000"),
                _rec("sft", 1, 25, "1110", "11111000", kl_rows=((0.4, 4), (0.6, 6))),
            ]
        )
        + "\n"
    )
    curves, md = report.generate(tmp_path)
    (sft,) = curves
    assert sft.seeds == [0, 1] and sft.steps == [0, 25]
    assert cv.level(sft, "acc", 1).mean == pytest.approx(62.5)  # (50 + 75) / 2
    g = cv.change(sft, "general", 1)
    assert g.mean == pytest.approx(0.0) and g.seeds == 2  # seed 0: -12.5 (one right→wrong), seed 1: +12.5
    # the t-interval over two seeds: mean 0, between-seed sd 17.7, so half-width t(1)·17.7/√2 = 159 points
    assert g.high == pytest.approx(12.706 * 17.678 / math.sqrt(2), rel=1e-3)
    assert cv.kl_at(sft, 1).mean == pytest.approx(0.05)  # seed 0: 0, seed 1: 1.0 / 10 nats per token
    assert "| sft | 25 (0.25) | 2 | 62.5 [" in md and "| 0.5 / 0.5 |" in md  # mean right→wrong / wrong→right


def test_the_report_counts_the_taught_format_in_general_replies_from_the_committed_answers(tmp_path, monkeypatch):
    """Every record gets `general.leak` from its unit's committed replies: 1 per generated suite reply that writes
    the opening of the format the in-domain rows teach (read from the data row each detail names), choices left out;
    a record whose replies are not committed, or whose study teaches no format, is left as it was."""
    import gzip

    from psft_lite.study import curves as cv

    monkeypatch.chdir(tmp_path)
    (tmp_path / "test.jsonl").write_text(
        json.dumps({"prompt": "1+1?", "completion": "2\n[[answer: 2]]", "format": "[[answer: {answer}]]"}) + "\n"
    )
    unit = tmp_path / "units" / "sft-s0"
    (unit / "evals").mkdir(parents=True)
    general = [
        {"id": "fact-001", "kind": "fact", "right": True, "answer": "[[answer: x]]"},  # a choice: never counted
        {"id": "instruction-001", "kind": "instruction", "right": True, "answer": "The cat sat.\n[[answer: 3]]"},
        {"id": "instruction-002", "kind": "instruction", "right": True, "answer": "We walked."},
    ]
    details = [
        {"set": "in_domain", "rows": [{"where": "test.jsonl:1", "generation": "2"}]},
        {"set": "general", "rows": general},
    ]
    with gzip.open(unit / "evals" / "sft-s0-step25.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(d) + "\n" for d in details))
    recs = [_rec("sft", 0, 25, "1", "111"), _rec("sft", 0, 50, "1", "111")]
    (unit / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    got = {r["step"]: r["general"].get("leak") for r in cv.read_records(tmp_path)}
    assert got == {25: "10", 50: None}  # step 50's replies are not committed

    with gzip.open(unit / "evals" / "sft-s0-step25.jsonl.gz", "wt") as f:  # multiple-choice kinds only: no replies
        f.write("".join(json.dumps(d) + "\n" for d in [details[0], {"set": "general", "rows": general[:1]}]))
    assert "leak" not in cv.read_records(tmp_path)[0]["general"]

    (tmp_path / "test.jsonl").write_text(json.dumps({"prompt": "1+1?", "completion": "#### 2"}) + "\n")
    cv._ROWS.clear()
    assert "leak" not in cv.read_records(tmp_path)[0]["general"]  # no taught format: nothing to count


def test_the_base_calibration_table_counts_each_kind_against_its_chance(tmp_path):
    """Per kind of suite item the base was scored on: its accuracy with an exact interval, and chance from the
    suite's options (0 for a generated reply), read from the base's committed answers."""
    import gzip

    from psft_lite.core.stats import clopper_pearson
    from psft_lite.inference.retention import load_suite
    from psft_lite.study import report

    suite = load_suite()
    facts = [it for it in suite if it.kind == "fact"][:4]
    checks = [it for it in suite if it.kind == "instruction"][:2]
    rows = [{"id": it.id, "kind": it.kind, "right": i < 3, "answer": ""} for i, it in enumerate(facts)]
    rows += [{"id": it.id, "kind": it.kind, "right": False, "answer": ""} for it in checks]
    (tmp_path / "units" / "base" / "evals").mkdir(parents=True)
    with gzip.open(tmp_path / "units" / "base" / "evals" / "base-step0.jsonl.gz", "wt") as f:
        f.write(json.dumps({"set": "general", "rows": rows}) + "\n")
    table = report.calibration_table(tmp_path)
    lo, hi = clopper_pearson(3, 4)
    chance = 100 * sum(1 / len(it.choices) for it in facts) / 4
    assert (
        f"| fact | log-likelihood of each option | 4 | 75.0 [{100 * lo:.1f}, {100 * hi:.1f}] | {chance:.0f} |" in table
    )
    assert "| instruction | a generated reply, verified | 2 | 0.0 [0.0, " in table and table.endswith("| 0 |\n")
    assert report.calibration_table(tmp_path / "nothing") == ""


def test_matched_comparisons_read_each_seed_between_its_measured_checkpoints(tmp_path):
    """At a matched in-domain accuracy each seed's change is interpolated between the two measured points that
    bracket the level (the base is step 0), the bracket is shown, and a method that never gets there says so."""
    from psft_lite.study import blocks, report
    from psft_lite.study import curves as cv

    recs = [_rec("base", 0, 0, "0000", "1111")]
    recs += [_rec("sft", 0, 25, "1100", "1110"), _rec("sft", 0, 50, "1111", "1100")]  # 50 %: -25; 100 %: -50
    recs += [_rec("sft_kl", 0, 25, "1000", "1111"), _rec("sft_kl", 0, 50, "1110", "1110")]  # 25 %: 0; 75 %: -25
    recs += [_rec("psft-base", 0, 25, "0000", "1111"), _rec("psft-base", 0, 50, "0000", "1111")]
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    curves, md = report.generate(tmp_path)
    sft, kl = next(c for c in curves if c.label == "sft"), next(c for c in curves if c.label == "sft_kl")
    m = cv.at_level(sft, "acc", 50.0, "general")
    assert m.estimate.mean == pytest.approx(-25.0) and m.brackets == {(0, 25)} and m.reached == 1
    m = cv.at_level(kl, "acc", 50.0, "general")  # halfway between 25 % (change 0) and 75 % (change -25)
    assert m.estimate.mean == pytest.approx(-12.5) and m.brackets == {(25, 50)}
    d = cv.at_level(kl, "acc", 50.0, "general", sft)
    assert d.estimate.mean == pytest.approx(12.5)  # sft_kl kept 12.5 points more at the same accuracy
    assert cv.levels(curves) == [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0]  # up to the lowest learning peak
    assert "| 50 | psft-base | not reached | — | 0 of 1 | — |" in md
    doc = f"intro\n{blocks.BEGIN}\nold\n{blocks.END}\nafter\n"
    assert blocks.splice(doc, md) == f"intro\n{blocks.BEGIN}\n{md}{blocks.END}\nafter\n"
    begin, end = blocks.markers("gemma3-270m")  # a second model's block: its own markers, the first left alone
    both = f"{doc}{begin}\nold\n{end}\n"
    assert blocks.splice(both, "new\n", "gemma3-270m") == f"{doc}{begin}\nnew\n{end}\n"
    with pytest.raises(ValueError, match="no <!-- benchmark-report other:begin"):
        blocks.splice(doc, md, "other")


def test_the_end_of_budget_table_pairs_each_methods_last_checkpoint_with_sfts_seed_by_seed(tmp_path):
    """Each method's last checkpoint minus sft's (whatever step each ended at), paired by seed and item, with every
    seed's general-ability difference; a seed sft does not have is left out."""
    from psft_lite.study import report

    recs = [_rec("base", 0, 0, "0000", "11110000")]
    for seed, general in ((0, "11100000"), (1, "11000000")):
        recs += [_rec("sft", seed, 25, "1100", "11110000"), _rec("sft", seed, 200, "1110", general)]
    recs += [_rec("eaft", 0, 200, "1100", "11110000"), _rec("eaft", 1, 200, "1110", "11110000")]  # +12.5, +25.0
    recs += [_rec("sft-replay", 0, 250, "1110", "11100000"), _rec("sft-replay", 2, 250, "1111", "11111111")]
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    curves, md = report.generate(tmp_path)
    table = report.end_table(curves, "sft")
    eaft = next(line for line in table.splitlines() if line.startswith("| eaft |"))
    cells = [c.strip() for c in eaft.strip("|").split("|")]
    assert cells[:3] == ["eaft", "2", "200 / 200"] and cells[5] == "s0 +12.5, s1 +25.0"
    assert cells[3].startswith("-12.5 [") and cells[4].startswith("+18.8 [")  # in-domain (-25 + 0) / 2
    assert "| sft-replay | 1 | 250 / 200 | +0.0 [" in table and "| s0 +0.0 |" in table  # seed 2 has no sft pair
    assert "#### At the end of the budget, against sft (the rule does not read this)" in md and table in md


def test_report_intervals_cover_the_truth_about_95_percent_of_the_time():
    """Three seeds, 400 items each, a true change of -3 points with seed-to-seed variation: the interval of the mean
    change covers -3 in about 95 % of 300 simulated studies (within Monte Carlo error), and the point is the mean of
    the observed seed values."""
    from psft_lite.study import curves as cv

    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(300):
        recs = [_rec("base", 0, 0, "0", "1" * 400)]
        for seed in range(3):
            p = 0.03 + rng.normal(0, 0.01)  # each seed forgets its own share
            general = "".join("0" if x else "1" for x in rng.random(400) < p)
            recs.append(_rec("sft", seed, 25, "1", general))
        curves, _ = cv.build_curves(recs)
        e = cv.change(curves[0], "general", 1)
        observed = np.mean([100 * (np.mean(curves[0].bits["general"][s, 1]) - 1) for s in range(3)])
        assert e.mean == pytest.approx(observed)
        covered += e.low <= -3.0 <= e.high
    assert 0.90 <= covered / 300 <= 0.995, covered


def _study(methods: dict[str, tuple[int, int]], seeds=(0, 1, 2)) -> list:
    """Records of a two-checkpoint study over 10 in-domain and 40 general items (the base knows 20): per method, the
    in-domain items right at step 100 and the general items it loses by then (seed s loses s more, so seeds differ).
    Every method is at 50 % in-domain at step 50, with nothing lost."""
    recs = [_rec("base", 0, 0, "0" * 10, "1" * 20 + "0" * 20)]
    for name, (right, lost) in methods.items():
        for s in seeds:
            recs.append(_rec(name, s, 50, "1" * 5 + "0" * 5, "1" * 20 + "0" * 20))
            gone = min(20, lost + s) if lost else 0
            recs.append(_rec(name, s, 100, "1" * right + "0" * (10 - right), "0" * gone + "1" * (20 - gone) + "0" * 20))
    return recs


def test_the_default_follows_the_rule_from_the_records():
    """The rule of docs/study.md, "How the default is chosen": a method that keeps what sft loses at the same learning
    wins; one that does not learn the task is out however little it forgets; with nothing better the current default
    stays only while it qualifies; a method worse on the second model is out; fewer than 3 seeds is provisional."""
    from psft_lite.study import curves as cv
    from psft_lite.study import verdicts as v

    def rows(methods, seeds=(0, 1, 2)):
        return v.rows(cv.build_curves(_study(methods, seeds))[0])

    smol = rows({"sft": (10, 10), "sft_kl": (10, 10), "keeps": (10, 0), "idle": (2, 0)})
    by = {r.label: r for r in smol}
    assert by["keeps"].level == 100.0 and by["keeps"].primary == "better"  # both reach 100 % in-domain
    assert by["keeps"].general.mean == pytest.approx(27.5)  # sft loses 10, 11, 12 of the 40 items over its seeds
    assert by["sft_kl"].primary == "no difference shown" and by["sft_kl"].learns
    assert not by["idle"].learns and by["idle"].learned.mean == pytest.approx(-80.0)
    d = v.decide({"smollm2": smol})
    assert (d.choice, d.provisional) == ("keeps", False)

    same = rows({"sft": (10, 10), "sft_kl": (10, 10), "idle": (2, 0)})
    assert v.decide({"smollm2": same}).choice == "sft_kl"  # nothing better: the current default stays
    assert v.decide({"smollm2": rows({"sft": (10, 10), "sft_kl": (2, 0)})}).choice == "sft"  # it does not learn

    worse = rows({"sft": (10, 0), "keeps": (10, 10)})  # on the second model it loses what sft keeps
    assert v.decide({"smollm2": smol, "gemma": worse}).choice == "sft_kl"
    early = v.decide({"smollm2": rows({"sft": (10, 10), "keeps": (10, 0)}, seeds=(0, 1))})
    assert early.provisional and early.choice == "sft"  # two seeds: t(1) = 12.7 leaves +27.5 points unproven
    assert "**Provisional**" in v.decision_markdown(early, {"smollm2": []})


def test_a_study_unit_commits_once_and_counts_the_compute_of_every_attempt(tmp_path):
    """bench/study_unit.sh: a unit's `seconds` adds a stopped attempt's time (its heartbeat, left beside the run
    folder) to the last attempt's, the records are committed, and a committed unit is skipped. `psft-lite study` is a
    stub here: the unit's logic is the script's."""
    import shutil
    import subprocess

    root = Path(__file__).resolve().parent.parent
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    shutil.copy(root / "bench" / "study_unit.sh", repo / "bench")
    stub = tmp_path / "python"
    stub.write_text(
        "#!/usr/bin/env bash\n"  # the collect step writes the unit's record; the study itself does nothing
        'if [ "$2" = psft_lite.study.report ]; then mkdir -p "$3" && echo "{}" > "$3/results.jsonl"; fi\n'
    )
    stub.chmod(0o755)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=repo, check=True)
    runs = tmp_path / "runs"
    (runs / "forgetting").mkdir(parents=True)
    (runs / "forgetting" / "sft-s0.seconds-earlier").write_text("120\n")  # an attempt before that one
    (runs / "forgetting" / "sft-s0.seconds-this").write_text("600\n")  # the stopped attempt's last heartbeat
    env = {**os.environ, "PYTHON": str(stub), "RUNS": str(runs), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t"}
    env.update(GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")

    def unit():
        return subprocess.run(
            ["bash", "bench/study_unit.sh", "forgetting", "sft-s0"], cwd=repo, env=env, capture_output=True, text=True
        )

    out = unit()
    assert out.returncode == 0, out.stderr
    assert "forgetting/sft-s0: committed" in out.stdout
    seconds = int((repo / "docs/study/forgetting/units/sft-s0/seconds").read_text())
    assert 720 <= seconds < 780  # 120 + 600 + this attempt's few seconds
    assert not list((runs / "forgetting").glob("sft-s0.seconds-*"))  # counted once
    log = subprocess.run(["git", "log", "--format=%s", "-1"], cwd=repo, capture_output=True, text=True).stdout
    assert log.startswith("Study records: forgetting unit sft-s0 (12 min on one core)")
    assert "already committed, skipped" in unit().stdout


#: the committed benchmark studies: folder under docs/study → the name of its block in docs/study.md
STUDIES = {"forgetting": "", "forgetting-gemma3": "gemma3-270m", "native": "native"}


@pytest.mark.parametrize("folder", sorted(STUDIES))
def test_the_committed_study_page_is_what_the_committed_records_generate(folder):
    """docs/study.md's benchmark blocks are exactly `make study-report`'s output on docs/study/benchmark (and the
    Gemma repeat's folder): no number on the page was typed by hand or left behind by newer records."""
    from psft_lite.study import blocks, report

    root = Path(__file__).resolve().parent.parent
    if not (root / "docs" / "study" / folder).exists():
        pytest.skip(f"no committed records in docs/study/{folder} yet")
    _, generated = report.generate(root / "docs" / "study" / folder)
    doc = (root / "docs" / "study.md").read_text(encoding="utf-8")
    assert blocks.splice(doc, generated, STUDIES[folder]) == doc, "docs/study.md is stale: run `make study-report`"


def test_the_committed_default_outcome_is_what_the_rule_reads_from_the_committed_records():
    """docs/study.md's "How the default is chosen" block is the rule applied to the committed SmolLM2 and Gemma
    records, exactly as `make study-report` writes it."""
    from psft_lite.study import blocks, verdicts

    root = Path(__file__).resolve().parent.parent
    generated = verdicts.outcome([root / "docs" / "study" / f for f in ("forgetting", "forgetting-gemma3")])
    doc = (root / "docs" / "study.md").read_text(encoding="utf-8")
    assert blocks.splice(doc, generated, verdicts.BLOCK) == doc, "docs/study.md is stale: run `make study-report`"


def test_every_benchmark_figure_the_readme_quotes_is_in_the_generated_tables():
    """README's "Which objective?" quotes the benchmark as `value [low, high]`; each such figure must appear in a row
    of docs/study.md's generated block (the same measure may sit in any column), so a stale quote fails here. (It
    quotes none while the benchmark's units are being run.)"""
    from psft_lite.study import blocks

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Which objective?") :]
    section = section[: section.index("\n## ", 3)]
    quoted = re.findall(r"([+-]?\d+\.\d+) \[([+-]?\d+\.\d+), ([+-]?\d+\.\d+)\]", section)
    doc = (root / "docs" / "study.md").read_text(encoding="utf-8")
    parts = [doc[doc.index(b) : doc.index(e)] for b, e in map(blocks.markers, STUDIES.values()) if b in doc]
    block = "\n".join(parts)
    for value, low, high in quoted:
        assert f"{value} [{low}, {high}]" in block, f"README quotes {value} [{low}, {high}], not in docs/study.md"
