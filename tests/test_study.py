"""`psft-lite study` end to end on the tiny model: results per epoch, resumable, tables and figures."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from psft_lite.core.errors import RecipeError
from psft_lite.recipe.schema import load_recipe
from psft_lite.study.runner import grid, latest_results, parse_sweep, plot_study, report_tables, run_study
from psft_lite.tracking.metrics import read_metrics

from conftest import arith_rows, make_recipe, write_jsonl

QUIET = Console(quiet=True)


def test_study_evaluates_every_epoch_resumes_and_reports(tmp_path, tiny_model_dir):
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
        train={"epochs": 2, "lr": 5e-3},
        eval={"sets": {"in_domain": str(test), "probe": str(probe)}},
    )
    recipe = load_recipe(path, ["train.max_steps=", "data.limit=8"])  # whole epochs of 2 optimizer steps
    out = tmp_path / "study"

    results_path = run_study(recipe, ["sft", "psft-base"], [0], out, limit=3, max_new_tokens=4, console=QUIET)
    results = read_metrics(results_path)
    assert sorted((r["method"], r["epoch"], r["step"]) for r in results) == [
        ("base", 0, 0),
        ("psft-base", 1, 2),
        ("psft-base", 2, 4),
        ("sft", 1, 2),
        ("sft", 2, 4),
    ]
    base = next(r for r in results if r["method"] == "base")
    sft2 = next(r for r in results if r["method"] == "sft" and r["epoch"] == 2)
    assert base["probe"]["kl_to_base"] == 0.0 and sft2["probe"]["kl_to_base"] > 0  # the adapter moved the model
    assert sft2["probe"]["mean_nll"] != base["probe"]["mean_nll"]
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
        eval={"sets": {"in_domain": str(test), "probe": str(probe)}},
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
    path = make_recipe(tmp_path, tiny_model_dir, train={"epochs": 2}, eval={"sets": {"in_domain": str(test)}})
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


def test_report_reads_hand_written_records_exactly(tmp_path):
    from psft_lite.study import report

    recs = [
        _bench_rec("base", 0, 0, "0000", [[0.0, 4], [0.0, 6]]),
        _bench_rec("sft", 0, 1, "1100", [[0.4, 4], [0.6, 6]], train_entropy=0.5),
        _bench_rec("sft", 1, 1, "1110", [[0.2, 4], [0.8, 6]], train_entropy=0.3),
        _bench_rec("sft", 1, 1, "1111", [[1.0, 4], [1.0, 6]]),  # an older duplicate is overridden by the later one
    ]
    recs[2], recs[3] = recs[3], recs[2]
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    curves, md = report.generate(tmp_path)
    (sft,) = curves
    assert sft.seeds == [0, 1] and sft.epochs == [1]
    assert list(report.point(sft, "acc")) == [0.0, 62.5]  # base, then the mean of 50 % and 75 %
    assert report.point(sft, "kl")[1] == pytest.approx(0.1)  # per seed 1.0/10 and 1.0/10 nats per token
    assert "| sft | 2 | 1 | 62.5 [" in md
    # the curve read where it first reaches a level, linearly between epochs
    assert report.crossing([0.0, 40.0, 60.0], [0.0, 0.1, 0.3], 50.0) == pytest.approx(0.2)
    assert math.isnan(report.crossing([0.0, 40.0], [0.0, 0.1], 50.0))
    doc = f"intro\n{report.BEGIN}\nold\n{report.END}\nafter\n"
    assert report.splice(doc, md) == f"intro\n{report.BEGIN}\n{md}{report.END}\nafter\n"
    begin, end = report.markers("gemma3-270m")  # a second model's block: its own markers, the first left alone
    both = f"{doc}{begin}\nold\n{end}\n"
    assert report.splice(both, "new\n", "gemma3-270m") == f"{doc}{begin}\nnew\n{end}\n"
    with pytest.raises(ValueError, match="no <!-- benchmark-report other:begin"):
        report.splice(doc, md, "other")


def test_a_seed_with_fewer_epochs_counts_where_it_was_evaluated(tmp_path):
    """A third seed trained for epoch 1 only joins epoch 1's point (and its intervals) and none of epoch 2's."""
    from psft_lite.study import report

    recs = [
        _bench_rec("base", 0, 0, "0000", [[0.0, 4]]),
        _bench_rec("sft", 0, 1, "1100", [[0.4, 4]]),
        _bench_rec("sft", 1, 1, "1110", [[0.8, 4]]),
        _bench_rec("sft", 2, 1, "0000", [[1.2, 4]]),
        _bench_rec("sft", 0, 2, "1111", [[0.4, 4]]),
        _bench_rec("sft", 1, 2, "1111", [[0.4, 4]]),
    ]
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    curves, md = report.generate(tmp_path)
    (sft,) = curves
    assert sft.seeds == [0, 1, 2] and sft.epochs == [1, 2]
    assert list(report.point(sft, "acc")) == pytest.approx([0.0, 125 / 3, 100.0])  # (50 + 75 + 0) / 3, then 2 seeds
    assert list(report.point(sft, "kl")) == pytest.approx([0.0, 0.2, 0.1])
    assert "| sft | 3 | 1 | 41.7 [" in md and "| sft | 2 | 2 | 100.0 [100.0, 100.0] |" in md
    reps = report.replicates(sft, "acc", report.Resampler())
    assert not np.isnan(reps).any() and (reps[:, 2] == 100.0).all()  # epoch 2 never draws the seed it lacks
    assert reps[:, 1].min() == 0.0  # epoch 1 does draw it (a replicate of seed 2 alone, on any problems)


def test_report_intervals_cover_the_mean_and_shrink_with_more_problems():
    from psft_lite.study import report

    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 800):
        bits = "".join("1" if x else "0" for x in rng.random(n) < 0.4)
        recs = [("base", _bench_rec("base", 0, 0, "0" * n, [[0.0, 1]] * n))]
        recs += [("sft", _bench_rec("sft", s, 1, bits, [[0.1, 1]] * n)) for s in (0, 1, 2)]
        curves, _ = report.build_curves(recs)
        reps = report.replicates(curves[0], "acc", report.Resampler())[:, 1]
        lo, hi = report.ci(reps)
        assert lo < report.point(curves[0], "acc")[1] < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2  # 16x the problems: about a quarter of the width


#: the committed benchmark studies: folder under docs/study → the name of its block in docs/study.md
STUDIES = {"benchmark": "", "benchmark-gemma3": "gemma3-270m"}


@pytest.mark.parametrize("folder", sorted(STUDIES))
def test_the_committed_study_page_is_what_the_committed_records_generate(folder):
    """docs/study.md's benchmark blocks are exactly `make study-report`'s output on docs/study/benchmark (and the
    Gemma repeat's folder): no number on the page was typed by hand or left behind by newer records."""
    from psft_lite.study import report

    root = Path(__file__).resolve().parent.parent
    if not (root / "docs" / "study" / folder).exists():
        pytest.skip(f"no committed records in docs/study/{folder} yet")
    _, generated = report.generate(root / "docs" / "study" / folder)
    doc = (root / "docs" / "study.md").read_text(encoding="utf-8")
    assert report.splice(doc, generated, STUDIES[folder]) == doc, "docs/study.md is stale: run `make study-report`"


def test_every_benchmark_figure_the_readme_quotes_is_in_the_generated_tables():
    """README's "Which objective?" quotes the benchmark as `value [low, high]`; each such figure must appear in a row
    of docs/study.md's generated block (the same measure may sit in any column), so a stale quote fails here."""
    from psft_lite.study import report

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Which objective?") :]
    section = section[: section.index("\n## ", 3)]
    quoted = re.findall(r"(\d+\.\d+) \[(\d+\.\d+), (\d+\.\d+)\]", section)
    assert len(quoted) >= 4, "the section quotes the benchmark"
    doc = (root / "docs" / "study.md").read_text(encoding="utf-8")
    blocks = [doc[doc.index(b) : doc.index(e)] for b, e in map(report.markers, STUDIES.values()) if b in doc]
    block = "\n".join(blocks)
    for value, low, high in quoted:
        assert f"{value} [{low}, {high}]" in block, f"README quotes {value} [{low}, {high}], not in docs/study.md"
