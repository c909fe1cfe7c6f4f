"""`psft-lite study` end to end on the tiny model: results per epoch, resumable, tables and figures."""

from __future__ import annotations

from rich.console import Console

from psft_lite.metrics import read_metrics
from psft_lite.recipe import load_recipe
from psft_lite.study import plot_study, report_tables, run_study

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
