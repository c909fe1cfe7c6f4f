"""psft-lite from Python (psft_lite.api): cheap to import, no global state changed, typed results, extension."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import psft_lite

from conftest import ROOT, arith_rows, make_recipe, write_jsonl


def test_importing_psft_lite_loads_no_torch_and_changes_no_logging():
    code = textwrap.dedent(
        """
        import logging, sys, warnings
        before = (logging.root.level, len(logging.root.handlers), len(warnings.filters))
        import psft_lite
        assert "torch" not in sys.modules and "transformers" not in sys.modules, sorted(sys.modules)
        assert callable(psft_lite.train) and "torch" not in sys.modules  # the names resolve lazily
        assert (logging.root.level, len(logging.root.handlers), len(warnings.filters)) == before
        import psft_lite.recipe.schema
        assert "torch" not in sys.modules  # a recipe is read and validated without torch
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_a_library_call_leaves_transformers_logging_and_warning_filters_as_it_found_them(tiny_model_dir):
    import warnings

    import transformers

    log = transformers.utils.logging
    log.set_verbosity_info()
    log.enable_progress_bar()
    filters = list(warnings.filters)
    try:
        model = psft_lite.load(tiny_model_dir, dtype="fp32")
        assert isinstance(model.generate("Hi", max_new_tokens=2), str)
        assert log.get_verbosity() == transformers.logging.INFO and log.is_progress_bar_enabled()
        assert warnings.filters == filters
    finally:
        log.set_verbosity_warning()


def test_train_evaluate_and_merge_return_typed_results(tmp_path, tiny_model_dir):
    path = make_recipe(tmp_path, tiny_model_dir)
    run = psft_lite.train(path, train={"max_steps": 2}, progress=False)
    assert run.steps == 2 and run.adapter.is_dir() and len(run.metrics) == 2 and run.metrics[-1]["step"] == 2
    assert run.seconds >= run.train_seconds > 0 and run.final_nll == pytest.approx(
        run.metrics[-1]["nll"], rel=1e-4
    )  # the file rounds
    ev = psft_lite.evaluate(
        run.run_dir, {"t": str(ROOT / "data" / "arith" / "test.jsonl")}, limit=2, max_new_tokens=4, progress=False
    )
    score = ev.sets["t"]
    assert score.n == 2 and 0 <= score.accuracy <= 1 and len(score.predictions) == 2 and ev.verdict is None
    merged = psft_lite.merge(run.run_dir, tmp_path / "merged", dtype="fp32", progress=False)
    assert (merged.path / "config.json").is_file() and merged.check["greedy_agreement"] > 0.9
    model = psft_lite.load(run.run_dir)
    one, many = model.generate("2+2?", max_new_tokens=3), model.generate(["2+2?", "Hi"], max_new_tokens=3)
    (g,) = model.generations([[{"role": "user", "content": "2+2?"}]], max_new_tokens=3)
    assert (
        isinstance(one, str)
        and len(many) == 2
        and one == g.text
        and 0 < g.n_tokens <= 3
        and isinstance(g.finished, bool)
    )
    # a recipe built in Python, overridden by sections and --set strings alike
    r = psft_lite.make_recipe(path, set=["train.lr=1e-4"], objective={"kind": "sft_kl"})
    assert r.train.lr == 1e-4 and r.objective.kind == "sft_kl" and r.path == path
    from psft_lite.core.errors import RecipeError

    with pytest.raises(RecipeError, match="objective.kind: unknown objective 'sft-kl'"):
        psft_lite.make_recipe(path, objective={"kind": "sft-kl"})


def _weighted_nll(logp, *, mask, weights, entropy, eaft_alpha):
    """A test objective: cross-entropy weighted by entropy**alpha (detached)."""
    w = entropy.detach().clamp(min=1e-6) ** eaft_alpha
    return -(weights * w * logp).sum(), {"mean_weight": (w * mask).sum() / mask.sum()}


def test_a_registered_objective_is_a_kind_the_recipe_accepts_and_trains(tmp_path, tiny_model_dir):
    from psft_lite.recipe.schema import ObjectiveSection
    from psft_lite.training.objectives import OBJECTIVES

    try:
        psft_lite.register_objective(
            "ent_weighted", _weighted_nll, inputs=("entropy",), params=("eaft_alpha",), stats=("mean_weight",)
        )
        assert ObjectiveSection(kind="ent_weighted").kind == "ent_weighted"
        path = make_recipe(
            tmp_path, tiny_model_dir, objective={"kind": "ent_weighted"}, train={"max_steps": 6, "lr": 3e-2}
        )
        run = psft_lite.train(path, progress=False)
        recs = run.metrics
        assert all("mean_weight" in r for r in recs) and recs[-1]["nll"] < recs[0]["nll"]
        for bad, message in [
            (dict(name="Bad-Name"), "lowercase"),
            (dict(loss="not a function"), "must be a function"),
            (dict(inputs=("logits",)), "unknown inputs"),
            (dict(inputs=("kl_base",)), "direction"),
            (dict(params=("no_such_key",)), "objective.no_such_key"),
            (dict(params=("kl_coef",)), "does not take kl_coef"),
        ]:
            args = {"name": "x", "loss": _weighted_nll, **bad}
            with pytest.raises(ValueError, match=message):
                psft_lite.register_objective(args.pop("name"), args.pop("loss"), **args)
    finally:
        OBJECTIVES.pop("ent_weighted", None)
        OBJECTIVES.pop("x", None)


def test_ddt_and_hint_from_python_check_their_data_before_the_model_and_return_typed_results(
    tmp_path, tiny_model_dir, monkeypatch
):
    """`psft_lite.ddt` scores every response token (the histogram counts them all) and `psft_lite.hint` rewrites into
    the file it is given; a bad data file or option is refused before any model loads."""
    from psft_lite.core.errors import DataError, RecipeError
    from psft_lite.inference import generate

    data = write_jsonl(tmp_path / "d.jsonl", arith_rows(3))
    d = psft_lite.ddt(tiny_model_dir, data)
    assert d.examples == 3 and d.tokens == sum(d.counts) > 0 and len(d.counts) == len(d.edges) + 1
    assert d.mean_phi < 0 and 0 <= d.shares["> -5"] <= 1 and d.lines()[-1].startswith("  verdict:")
    assert d.as_dict()["share_phi_gt_-5"] == d.shares["> -5"]
    h = psft_lite.hint(
        tiny_model_dir,
        data,
        tmp_path / "h.jsonl",
        limit=2,
        keep="all",
        cot_fallback=True,
        max_new_tokens=2,
        progress=False,
    )
    assert h.kept == 2 and len(h.out.read_text().splitlines()) == 2 and h.lines()[0].startswith("hint: 2 of 2 kept")

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the data were checked")

    monkeypatch.setattr(generate, "load_model", no_model)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"\n')
    with pytest.raises(DataError, match="bad.jsonl:1: not valid JSON"):
        psft_lite.ddt(tiny_model_dir, tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="bad.jsonl:1: not valid JSON"):
        psft_lite.hint(tiny_model_dir, tmp_path / "bad.jsonl", tmp_path / "h2.jsonl")
    with pytest.raises(RecipeError, match="--keep 'some'"):
        psft_lite.hint(tiny_model_dir, data, tmp_path / "h2.jsonl", keep="some")
    assert not (tmp_path / "h2.jsonl").exists()


class _Memo:
    """A tracker kept in memory: what a user's own backend looks like (base.Backend's calls)."""

    name, module, extra, replays_resumed_steps = "memo", "", "", False
    seen: list[tuple[str, object]] = []

    @classmethod
    def open(cls, run_dir, state, project, start_step):
        return cls()

    @staticmethod
    def where(run_dir, project, state):
        return "memo: in memory"

    def start(self, config):
        self.seen.append(("start", config["train.lr"]))

    def scalars(self, values, step):
        self.seen.append(("scalars", step))

    def text(self, tag, message, step):
        self.seen.append(("text", step))

    def finish(self, summary, status, step):
        self.seen.append(("finish", status))


def _write_note(run_dir, output, console):
    (run_dir / "note.txt").write_text("adapter at " + str(run_dir / "adapter"))
    return {"note": str(run_dir / "note.txt")}


def test_a_registered_tracker_and_output_format_are_names_the_recipe_accepts_and_a_run_uses(tmp_path, tiny_model_dir):
    """One call each: the recipe then takes the name, training reports every step to the tracker and calls the writer
    at the end; a malformed one is refused naming what is wrong, and a check that fails stops the run before it
    loads a model."""
    from psft_lite.core.errors import RecipeError
    from psft_lite.exporting.outputs import FORMATS
    from psft_lite.tracking.trackers import BACKENDS

    try:
        with pytest.raises(RecipeError, match="unknown tracker 'memo'"):
            psft_lite.make_recipe(make_recipe(tmp_path, tiny_model_dir), output={"report_to": ["memo"]})
        psft_lite.register_tracker(_Memo)
        psft_lite.register_output("note", _write_note)
        path = make_recipe(
            tmp_path, tiny_model_dir, train={"max_steps": 3}, output={"report_to": ["memo"], "save": ["note"]}
        )
        run = psft_lite.train(path, progress=False)
        assert _Memo.seen[0] == ("start", 1e-3) and _Memo.seen[-1] == ("finish", "finished")
        assert [step for kind, step in _Memo.seen if kind == "scalars"][:3] == [1, 2, 3]
        assert (run.run_dir / "note.txt").read_text().startswith("adapter at ")

        class NoFinish:
            name, module, extra, replays_resumed_steps = "half", "", "", False
            open = where = start = scalars = text = _Memo.open

        for bad, message in [(NoFinish, "lacks finish"), (type("X", (), {"name": "Bad Name"}), "lowercase")]:
            with pytest.raises(ValueError, match=message):
                psft_lite.register_tracker(bad)
        for name, write, message in [("adapter", _write_note, "cannot be replaced"), ("n2", "x", "must be a function")]:
            with pytest.raises(ValueError, match=message):
                psft_lite.register_output(name, write)

        def refuse(where):
            raise RecipeError(f"{where}: output.save = 'picky' needs a disk we do not have.")

        psft_lite.register_output("picky", _write_note, check=refuse)
        path = make_recipe(tmp_path, tiny_model_dir, output={"save": ["picky"], "dir": str(tmp_path / "picky")})
        with pytest.raises(RecipeError, match="needs a disk we do not have"):
            psft_lite.train(path, progress=False)
        assert not (tmp_path / "picky").exists()
    finally:
        BACKENDS.pop("memo", None)
        for name in ("note", "picky", "n2"):
            FORMATS.pop(name, None)


@pytest.mark.slow
def test_the_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    """The README's "From Python" block, executed as written (output folder moved to a temporary one, and for time
    the retention suite cut to every 20th item and its KL prompts to every 30th)."""
    from psft_lite.inference import retention

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- python-example:begin -->\n```python\n(.*?)```\n<!-- python-example:end -->", readme, re.S)
    code = block.group(1).replace('"runs/from-python"', json.dumps(str(tmp_path / "from-python")))
    from psft_lite.model import loading

    suite, prompts = retention.load_suite()[::20], retention.read_prompts()[::30]
    monkeypatch.setattr(retention, "load_suite", lambda path=None, kinds=(): suite)
    monkeypatch.setattr(retention, "read_prompts", lambda path=None: prompts)
    models = loading.embedded_model_dir().parent  # the shared cache's models, before the home moves
    monkeypatch.setenv("PSFT_LITE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(ROOT)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "models").symlink_to(models)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert re.search(r"general ability: [\d.]+ % → [\d.]+ % \([+-][\d.]+ \[", out), out
    assert namespace["after"].general_ability.kl_prompts == len(prompts) == 10
    assert namespace["run"].steps == 10 and namespace["gguf"].files[0].suffix == ".gguf"
    assert isinstance(namespace["model"].generate("Hi", max_new_tokens=2), str)
    assert torch.get_num_threads() >= 1
