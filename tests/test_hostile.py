"""Hostile input, generated: every recipe and data file either works or ends in one clear message (exit 2).

Property-based (hypothesis): random TOML values and types, missing and extra keys, unicode, empty strings, huge
numbers, rows of the wrong shape, mixed formats, binary garbage, truncated files, 0-byte files, examples longer than
max_length. Never a traceback, never a half-written run directory.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psft_lite import cli
from psft_lite.core.errors import DataError, RecipeError
from psft_lite.data import load_examples
from psft_lite.recipe.schema import FORMAT_FIELDS, Recipe, load_recipe

from conftest import make_recipe

CASES = int(os.environ.get("PSFT_HOSTILE_CASES", "150"))
FUZZ = settings(max_examples=CASES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

# -- strategies --------------------------------------------------------------------------------------------------------

text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)  # any unicode but lone surrogates
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    text,
    st.just(""),
    st.just("all-linear"),
    st.sampled_from(["sft", "psft", "idft", "dft", "bf16", "fp32", "token", "drop", "cosine", "snapshot", "base"]),
)
toml_values = st.recursive(
    scalars.filter(lambda v: v is not None),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)),
    max_leaves=6,
)

SECTION_KEYS = {name: list(f.annotation.model_fields) for name, f in Recipe.model_fields.items()}  # type: ignore[union-attr]


@st.composite
def recipes(draw):
    raw: dict = {}
    for section, keys in SECTION_KEYS.items():
        if draw(st.booleans()):
            chosen = draw(st.lists(st.sampled_from(keys), max_size=4, unique=True))
            raw[section] = {k: draw(toml_values) for k in chosen}
    if draw(st.booleans()):  # unknown sections and keys
        raw[draw(text.filter(bool))] = {draw(text.filter(bool)): draw(toml_values)}
    if draw(st.booleans()) and isinstance(raw.get("train"), dict):
        raw["train"][draw(text.filter(bool))] = draw(toml_values)
    return raw


FIELD_NAMES = sorted({v for names in FORMAT_FIELDS.values() for v in names.values()} | {"question", "answer", "text"})
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), text),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["role", "content", "from", "value", "x"]), inner, max_size=3),
    ),
    max_leaves=8,
)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot", ""]), "content": text})
rows = st.one_of(
    st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=4),
    st.fixed_dictionaries({"prompt": text, "completion": text}),
    st.fixed_dictionaries({"messages": st.lists(message, max_size=4)}),
    st.fixed_dictionaries({"instruction": text, "output": text}, optional={"input": text}),
    st.fixed_dictionaries(
        {
            "conversations": st.lists(
                st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system", "alien"]), "value": text}),
                max_size=4,
            )
        }
    ),
    json_values,  # not even an object
)


def write_rows(path: Path, suffix: str, items: list, cut: float | None, garbage: bytes | None) -> Path:
    f = path / f"data{suffix}"
    if garbage is not None:
        f.write_bytes(garbage)
        return f
    if suffix == ".jsonl":
        f.write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    elif suffix == ".json":
        f.write_text(json.dumps(items), encoding="utf-8")
    elif suffix == ".csv":
        keys = sorted({k for r in items if isinstance(r, dict) for k in r})
        lines = [",".join(keys)] + [
            ",".join(json.dumps(r.get(k, "")) if isinstance(r, dict) else "x" for k in keys) for r in items
        ]
        f.write_text("\n".join(lines), encoding="utf-8")
    else:
        try:
            pq.write_table(pa.Table.from_pylist([r for r in items if isinstance(r, dict) and r]), f)
        except (pa.ArrowException, ValueError, TypeError):
            f.write_bytes(b"PAR1 not really parquet")
    if cut is not None and f.stat().st_size:  # a truncated file
        data = f.read_bytes()
        f.write_bytes(data[: int(len(data) * cut)])
    return f


# -- properties --------------------------------------------------------------------------------------------------------


@FUZZ
@given(raw=recipes(), overrides=st.lists(st.text(max_size=30), max_size=2))
def test_recipe_loader_accepts_or_names_the_problem(raw, overrides):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.toml"
        try:
            path.write_text(tomli_w.dumps(raw), encoding="utf-8")
        except (TypeError, ValueError):
            return  # not representable as TOML (e.g. mixed-type arrays in old tomli-w): nothing to load
        try:
            r = load_recipe(path, overrides)
        except RecipeError as e:
            msg = str(e)
            assert msg and ("r.toml" in msg or "--set" in msg), msg
            return
        assert isinstance(r, Recipe)


@FUZZ
@given(blob=st.one_of(st.binary(max_size=200), st.text(max_size=200)))
def test_recipe_loader_on_arbitrary_bytes(blob):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.toml"
        path.write_bytes(blob if isinstance(blob, bytes) else blob.encode("utf-8", "surrogatepass"))
        try:
            load_recipe(path)
        except RecipeError as e:
            assert "r.toml" in str(e)


@FUZZ
@given(
    items=st.lists(rows, max_size=6),
    suffix=st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]),
    fmt=st.sampled_from(["auto", "prompt_completion", "messages", "alpaca", "sharegpt"]),
    max_length=st.sampled_from([2, 8, 64, 1024]),
    truncation=st.sampled_from(["drop", "truncate", "error"]),
    cut=st.one_of(st.none(), st.floats(0.0, 1.0)),
    garbage=st.one_of(st.none(), st.none(), st.binary(max_size=64)),
)
def test_every_data_format_loads_or_names_file_and_row(
    tokenizer, items, suffix, fmt, max_length, truncation, cut, garbage
):
    from psft_lite.recipe.schema import DataSection

    with tempfile.TemporaryDirectory() as tmp:
        f = write_rows(Path(tmp), suffix, items, cut, garbage)
        data = DataSection(train=str(f), format=fmt, max_length=max_length, truncation=truncation)
        try:
            examples, stats = load_examples(data.train[0], data, tokenizer)
        except DataError as e:
            assert str(f) in str(e), str(e)
            return
        assert examples and all(e.mask.any() and not e.mask[0] and len(e) <= max_length for e in examples)


def _run_cli(*args: str) -> tuple[int, str]:
    err = io.StringIO()
    old = sys.argv
    sys.argv = ["psft-lite", *args]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old
    return code, err.getvalue()


@settings(max_examples=max(CASES // 5, 10), deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    items=st.lists(rows, min_size=0, max_size=4),
    suffix=st.sampled_from([".jsonl", ".csv"]),
    sets=st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "train.lr",
                    "train.batch_size",
                    "data.max_length",
                    "objective.kind",
                    "lora.r",
                    "data.format",
                    "train.max_steps",
                    "model.dtype",
                ]
            ),
            st.sampled_from(["0", "-1", "1e400", '"x"', "2", "[]", "psft", "fp16", "16", "3"]),
        ),
        max_size=2,
    ),
)
def test_train_end_to_end_never_tracebacks_or_leaves_half_a_run(tiny_model_dir, items, suffix, sets):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp) / "a dir with spaces"
        tmp.mkdir()
        recipe = make_recipe(tmp, tiny_model_dir, train={"max_steps": 1, "batch_size": 2, "micro_batch_size": 2})
        data = write_rows(tmp, suffix, items, None, None)
        args = ["train", str(recipe), "--set", f"data.train={json.dumps(str(data))}"]
        for key, value in sets:
            args += ["--set", f"{key}={value}"]
        code, err = _run_cli(*args)
        run = tmp / "run"
        assert "Traceback" not in err
        if code == 0:
            assert (run / "adapter" / "adapter_model.safetensors").is_file()
        else:
            assert code == 2, err
            assert err.count("error:") == 1 and (
                str(recipe) in err or str(data) in err or "--set" in err or "model" in err
            ), err
            assert not run.exists() or not (run / "adapter").exists() and not (run / "checkpoints").exists()


# -- paths and models --------------------------------------------------------------------------------------------------


def test_output_dir_that_cannot_be_created(tmp_path, tiny_model_dir):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    recipe = make_recipe(tmp_path, tiny_model_dir, train={"max_steps": 1}, output={"dir": str(blocker / "run")})
    code, err = _run_cli("train", str(recipe))
    assert code == 2 and "output.dir" in err and "Traceback" not in err


def test_tokenizer_without_chat_template_explains_how_to_set_one(tmp_path, tiny_model_dir):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "chat_template.jinja").unlink()
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    recipe = make_recipe(tmp_path, bare, train={"max_steps": 1})
    code, err = _run_cli("train", str(recipe))
    assert code == 2 and "has no chat template" in err and "model.chat_template" in err
    code, err = _run_cli("train", str(recipe), "--set", "model.chat_template=chatml")
    assert code == 0, err


def test_4bit_without_bitsandbytes_explains_the_fallback(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as on a machine without it
    recipe = make_recipe(tmp_path, tiny_model_dir, model={"load_in_4bit": True}, train={"max_steps": 1})
    code, err = _run_cli("train", str(recipe))
    assert code == 2 and "bitsandbytes" in err and "load_in_4bit = false" in err
    assert not (tmp_path / "run").exists()


def test_model_that_needs_remote_code(tmp_path, tiny_model_dir):
    import shutil

    custom = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, custom)
    cfg = json.loads((custom / "config.json").read_text())
    cfg.update(
        model_type="mycustom",
        architectures=["MyForCausalLM"],
        auto_map={"AutoConfig": "conf.MyConfig", "AutoModelForCausalLM": "mod.MyModel"},
    )
    (custom / "config.json").write_text(json.dumps(cfg))
    (custom / "conf.py").write_text("raise RuntimeError('remote code must not run')\n")
    code, err = _run_cli("train", str(make_recipe(tmp_path, custom, train={"max_steps": 1})))
    assert code == 2 and "trust_remote_code" in err and "remote code must not run" not in err
