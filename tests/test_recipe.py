"""Recipes: every shipped recipe validates; bad keys and values are reported at once, with the key and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from psft_lite.core.errors import RecipeError
from psft_lite.recipe.schema import ObjectiveSection, load_recipe, parse_override, recipe_from_dict, reference_markdown

ROOT = Path(__file__).resolve().parent.parent


SHIPPED = sorted(str(p.relative_to(ROOT / "recipes")) for p in (ROOT / "recipes").rglob("*.toml"))


def test_the_recipes_the_readme_names_are_shipped():
    assert {"quickstart.toml", "math.toml", "study/arith.toml"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)  # every recipe in recipes/, by name: a new one is covered
def test_every_shipped_recipe_validates(name):
    r = load_recipe(ROOT / "recipes" / name)
    assert all(s.path for s in r.data.train)
    assert not r.warnings(), r.warnings()  # shipped recipes set nothing that is ignored or suspicious


def test_math_recipe_is_qlora_gsm8k_with_the_default_objective():
    r = load_recipe(ROOT / "recipes" / "math.toml")
    assert r.model.load_in_4bit and r.model.name == "Qwen/Qwen2.5-1.5B-Instruct"
    assert (r.data.train[0].path, r.data.train[0].config, r.data.train[0].split) == ("openai/gsm8k", "main", "train")
    assert r.objective.kind == "sft_kl" == ObjectiveSection().kind  # the recipes follow the default (docs/study.md)
    assert load_recipe(ROOT / "recipes" / "quickstart.toml").objective.kind == "sft_kl"


def _bad(tmp_path, text: str, *overrides: str) -> str:
    p = tmp_path / "r.toml"
    p.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(p, overrides)
    return str(e.value)


def test_all_problems_reported_with_key_line_and_hint(tmp_path):
    msg = _bad(
        tmp_path,
        '[data]\ntrain = "x.jsonl"\nformt = "messages"\n\n[train]\nlr = -1\nbatch_size = "8"\n\n[objectiv]\nkind = '
        '"sft"\n',
    )
    assert "4 problems" in msg
    assert "r.toml:3: data.formt: unknown key (did you mean 'format'?)" in msg
    assert "r.toml:6: train.lr: input should be greater than 0 (got -1)" in msg
    assert "train.batch_size: input should be a valid integer (got '8')" in msg
    assert "objectiv: unknown key (did you mean 'objective'?)" in msg


def test_cross_field_and_toml_syntax_errors(tmp_path):
    msg = _bad(tmp_path, '[data]\ntrain = "x.jsonl"\n[train]\nbatch_size = 6\nmicro_batch_size = 4\n')
    assert "multiple of train.micro_batch_size" in msg
    assert "not valid TOML" in _bad(tmp_path, "[data\ntrain = 1\n")
    assert "data: required but missing" in _bad(tmp_path, "[train]\nlr = 1e-4\n")
    msg = _bad(tmp_path, '[data]\ntrain = "x.jsonl"\nfields = { promt = "q" }\n')
    assert "did you mean 'prompt'" in msg


def test_overrides_are_typed_and_checked(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[data]\ntrain = "x.jsonl"\n')
    r = load_recipe(p, ["train.lr=1e-3", "data.train.split=test", 'lora.target_modules=["q_proj"]', "model.name=a/b"])
    assert r.train.lr == 1e-3 and r.data.train[0].split == "test" and r.lora.target_modules == ["q_proj"]
    assert r.model.name == "a/b"
    assert parse_override("output.dir=runs/x y") == (["output", "dir"], "runs/x y")
    with pytest.raises(RecipeError, match="section.key=value"):
        parse_override("train.lr")
    assert "train.lr" in _bad(tmp_path, '[data]\ntrain = "x.jsonl"\n', "train.lr=abc")
    p.write_text('[data]\ntrain = "x.jsonl"\neval = "y.jsonl"\n[train]\nmax_steps = 5\n')
    r = load_recipe(p, ["data.eval=", "train.max_steps= ", "train.epochs=2"])  # an empty value unsets a key
    assert r.data.eval is None and r.train.max_steps is None and r.train.epochs == 2


def test_psft_with_k1_warns_and_run_dir_defaults_to_recipe_name(tmp_path):
    r = recipe_from_dict(
        {"data": {"train": "x.jsonl"}, "objective": {"kind": "psft", "old_policy": "snapshot", "refresh_every": 1}}
    )
    assert any("exactly SFT" in w for w in r.warnings())
    r = recipe_from_dict({"data": {"train": "x.jsonl"}, "objective": {"kind": "sft", "clip_high": 0.5}})
    assert any("objective.clip_high only applies to kind = 'psft'" in w for w in r.warnings())
    # a key two kinds read is one warning naming both, not two that each say "only"
    r = recipe_from_dict({"data": {"train": "x.jsonl"}, "objective": {"kind": "psft", "reference_top_k": 20}})
    topk = [w for w in r.warnings() if "reference_top_k" in w]
    assert topk == [
        "objective.reference_top_k only applies to kind = 'sft_kl' or 'asft' (this recipe's kind is 'psft') and is "
        "ignored."
    ]
    p = tmp_path / "my-run.toml"
    p.write_text('[data]\ntrain = "x.jsonl"\n')
    assert load_recipe(p).run_dir == Path("runs/my-run")


def test_resolved_recipe_round_trips(tmp_path):
    r = load_recipe(ROOT / "recipes" / "math.toml")
    p = tmp_path / "resolved.toml"
    p.write_text(r.to_toml())
    again = load_recipe(p)
    assert again.model_dump() == r.model_dump()


def test_readme_recipe_reference_is_current():
    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- recipe-reference:start -->\n", "<!-- recipe-reference:end -->"
    block = readme[readme.index(start) + len(start) : readme.index(end)]
    assert block == reference_markdown(), "regenerate with: make docs"
