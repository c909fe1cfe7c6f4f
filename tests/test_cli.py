"""The command line: end to end on a tiny model, and every bad input → exit 2, one clear message, nothing written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from psft_lite import cli

from conftest import ROOT, make_recipe, run_cli, write_jsonl


def test_train_end_to_end_writes_exactly_the_run_layout(tmp_path, tiny_model_dir, capsys):
    recipe = make_recipe(
        tmp_path, tiny_model_dir, objective={"kind": "psft", "old_policy": "snapshot", "refresh_every": 2}
    )
    code, out, err = run_cli(capsys, "train", str(recipe), "--set", "train.max_steps=4")
    assert code == 0, err
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "checkpoints", "metrics.jsonl", "recipe.toml"]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-4"]  # the final state, for --resume
    assert sorted(p.name for p in (run / "checkpoints" / "step-4").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "optimizer.pt",
        "policy.pt",
        "recipe.toml",
        "rng.pt",
        "trainer_state.json",
    ]
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
        "psft_lite.json",
    } <= {p.name for p in (run / "adapter").iterdir()}
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in (
        "epoch",
        "loss",
        "nll",
        "entropy",
        "grad_norm",
        "lr",
        "tokens",
        "tokens_per_s",
        "peak_mem_mb",
        "clip_frac",
        "ratio_mean",
        "ratio_max",
        "approx_kl",
    ):
        assert key in records[0], key
    assert "max_steps = 4" in (run / "recipe.toml").read_text()  # the resolved recipe, overrides applied
    assert f"adapter: {run / 'adapter'}" in out
    assert "Traceback" not in err


def test_version_and_help(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.startswith("psft-lite ")
    commands = [c.name or c.callback.__name__ for c in cli.app.registered_commands]
    assert {"train", "validate", "merge", "generate", "chat", "eval", "ddt", "plot", "hint", "study"} <= set(commands)
    for cmd in commands:  # every command, so a new one needs its example too
        code, out, _ = run_cli(capsys, cmd, "--help")
        assert code == 0 and "Example:" in out


def test_validate_accepts_math_recipe_without_network(capsys):
    code, out, err = run_cli(capsys, "validate", str(ROOT / "recipes" / "math.toml"))
    assert code == 0, err
    assert "Qwen/Qwen2.5-1.5B-Instruct (4-bit NF4)" in out and "openai/gsm8k" in out


BAD_CASES = {
    "missing recipe": (lambda t, m: ["train", str(t / "nope.toml")], "recipe file not found"),
    "bad toml": (lambda t, m: ["train", _write(t / "r.toml", "[train\nlr=1")], "not valid TOML"),
    "unknown key": (lambda t, m: ["train", str(make_recipe(t, m)), "--set", "train.lrr=1"], "did you mean 'lr'"),
    "bad value": (lambda t, m: ["train", str(make_recipe(t, m)), "--set", "objective.kind=ppo"], "objective.kind"),
    "row missing field": (
        lambda t, m: [
            "train",
            str(make_recipe(t, m)),
            "--set",
            f"data.train={_rows(t, [{'prompt': 'x', 'completion': 'y'}, {'prompt': 'x'}])}",
        ],
        "bad.jsonl:2: missing field 'completion'",
    ),
    "empty data": (
        lambda t, m: ["train", str(make_recipe(t, m)), "--set", f"data.train={_write(t / 'e.jsonl', '')}"],
        "the file is empty",
    ),
    "all too long": (
        lambda t, m: ["train", str(make_recipe(t, m)), "--set", "data.max_length=8"],
        "none of its 16 examples fit",
    ),
    "not a model": (lambda t, m: ["train", str(make_recipe(t, t))], "not a model folder (no config.json)"),
    "missing model path": (lambda t, m: ["train", str(make_recipe(t, "./no/such/model"))], "no such model folder"),
    "hub model offline": (
        lambda t, m: ["train", str(make_recipe(t, "nobody/no-such-model-xyz"))],
        "model.name 'nobody/no-such-model-xyz' is not a local folder or file and not in the local Hugging Face cache",
    ),
    "bad target modules": (
        lambda t, m: ["train", str(make_recipe(t, m)), "--set", 'lora.target_modules=["nope"]'],
        "lora.target_modules",
    ),
    "fp16 on cpu": (lambda t, m: ["train", str(make_recipe(t, m)), "--set", "model.dtype=fp16"], "fp16"),
    "merge: not an adapter": (lambda t, m: ["merge", str(t)], "not an adapter (no adapter_config.json)"),
    "merge: bad dtype": (lambda t, m: ["merge", str(t), "--dtype", "int8"], "--dtype 'int8'"),
    "resume without checkpoint": (
        lambda t, m: ["train", _write(t / "run" / "recipe.toml", _resolved(t, m)), "--resume"],
        "no checkpoint in",
    ),
    "eval: no data": (lambda t, m: ["eval", str(m)], "no data to evaluate"),
    "eval: samples without temperature": (
        lambda t, m: ["eval", str(m), "--data", "x.jsonl", "--samples", "3"],
        "--samples > 1 needs --temperature > 0",
    ),
    "generate: no prompt": (lambda t, m: ["generate", str(m)], "give either --prompt"),
    "plot: not a run": (lambda t, m: ["plot", str(t)], "no metrics.jsonl"),
    "ddt: missing data": (lambda t, m: ["ddt", str(m), "--data", "./nope.jsonl"], "data file not found"),
    "hint: bad keep": (
        lambda t, m: ["hint", str(m), "--data", "x.jsonl", "--out", str(t / "h.jsonl"), "--keep", "some"],
        "--keep 'some'",
    ),
    "hint: missing data": (
        lambda t, m: ["hint", str(m), "--data", "./nope.jsonl", "--out", str(t / "h.jsonl")],
        "data file not found",
    ),
    "hint: --out is another file": (
        lambda t, m: [
            "hint",
            str(m),
            "--data",
            _rows(t, [{"prompt": "1+1?", "completion": "#### 2"}]),
            "--out",
            _write(t / "mine.jsonl", '{"a": 1}\n{"a": 2}\n'),
        ],
        "mine.jsonl:1: not a line written by psft-lite hint",
    ),
    "missing eval data": (
        lambda t, m: ["train", str(make_recipe(t, m)), "--set", "data.eval=./missing.jsonl"],
        "data file not found",
    ),
}


def _write(path, text):
    path.write_text(text)
    return str(path)


def _resolved(t, m):
    (t / "run").mkdir(exist_ok=True)
    return make_recipe(t, m).read_text()


def _rows(t, rows):
    return str(write_jsonl(t / "bad.jsonl", rows))


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_exits_2_with_one_message_and_writes_nothing(tmp_path, tiny_model_dir, capsys, case):
    make_args, expected = BAD_CASES[case]
    code, out, err = run_cli(capsys, *make_args(tmp_path, tiny_model_dir))
    assert code == 2, (case, err)
    assert expected in err, err
    assert "Traceback" not in err and err.count("error:") == 1
    assert not (tmp_path / "run").exists() or case == "resume without checkpoint"


def test_existing_run_dir_is_refused_then_replaced_with_overwrite(tmp_path, tiny_model_dir, capsys):
    recipe = make_recipe(tmp_path, tiny_model_dir, train={"max_steps": 1})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "train", str(recipe), "--overwrite")
    assert code == 2 and "not a psft-lite run directory" in err
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    (tmp_path / "run" / "notes.txt").unlink()
    assert run_cli(capsys, "train", str(recipe))[0] == 0
    (tmp_path / "run" / "leftover.txt").write_text("from the first run")
    code, _, err = run_cli(capsys, "train", str(recipe))
    assert code == 2 and "--overwrite" in err
    assert (tmp_path / "run" / "leftover.txt").exists()  # refused: nothing touched
    assert run_cli(capsys, "train", str(recipe), "--overwrite")[0] == 0
    assert not (tmp_path / "run" / "leftover.txt").exists()  # replaced, not mixed into
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "event" not in r] == [1]


@pytest.mark.slow
def test_hint_end_to_end_and_a_rerun_reports_every_example(tmp_path, tiny_model_dir, capsys):
    from conftest import arith_rows

    src = write_jsonl(tmp_path / "in.jsonl", arith_rows(3))
    args = [
        "hint",
        str(tiny_model_dir),
        "--data",
        str(src),
        "--out",
        str(tmp_path / "h" / "out.jsonl"),
        "--keep",
        "all",
        "--cot-fallback",
        "--max-new-tokens",
        "4",
    ]
    code, out, err = run_cli(capsys, *args, "--limit", "2")
    assert code == 0, err
    assert "hint: 2 of 2 kept" in out and "(0 were done before this run)" in out and "mean φ reference" in out
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "hint: 3 of 3 kept" in out and "(2 were done before this run)" in out
    assert len((tmp_path / "h" / "out.jsonl").read_text().splitlines()) == 3
    assert (tmp_path / "h" / "out.dropped.jsonl").read_text() == ""


def test_real_entry_point_prints_no_traceback(tmp_path):
    bad = tmp_path / "r.toml"
    bad.write_text('[data]\ntrain = "x.jsonl"\n[train]\nlr = "fast"\n')
    p = subprocess.run([sys.executable, "-m", "psft_lite", "validate", str(bad)], capture_output=True, text=True)
    assert p.returncode == 2
    assert "train.lr: input should be a valid number (got 'fast')" in p.stderr and "Traceback" not in p.stderr


def test_hub_layout_data_set_config_and_split_on_the_command_line(tmp_path, tiny_model_dir, capsys):
    """`--data-config` / `--split` reach datasets.load_dataset (the hub code path) for ddt, eval and hint."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "gsm8k"
    (root / "main").mkdir(parents=True)
    for split, add, n in (("train", 1, 5), ("test", 2, 3)):
        rows = [
            {"question": f"What is {i} + {add}?", "answer": f"{i} + {add} = {i + add}\n#### {i + add}"}
            for i in range(n)
        ]
        pq.write_table(pa.Table.from_pylist(rows), root / "main" / f"{split}-00000-of-00001.parquet")
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n    path: main/train-*\n"
        "  - split: test\n    path: main/test-*\n---\n"
    )
    data = ["--data", str(root), "--data-config", "main"]
    code, out, err = run_cli(capsys, "ddt", str(tiny_model_dir), *data, "--split", "test", "--json")
    assert code == 0, err
    assert json.loads(out)["examples"] == 3
    code, out, err = run_cli(capsys, "eval", str(tiny_model_dir), *data, "--max-new-tokens", "2")  # eval reads test
    assert code == 0, err
    assert "n=3" in out
    code, out, err = run_cli(
        capsys,
        "hint",
        str(tiny_model_dir),
        *data,
        "--out",
        str(tmp_path / "h.jsonl"),
        "--limit",
        "1",
        "--keep",
        "all",
        "--cot-fallback",
        "--max-new-tokens",
        "2",
    )
    assert code == 0, err
    assert json.loads((tmp_path / "h.jsonl").read_text())["question"] == "What is 0 + 1?"  # the train split
    code, out, err = run_cli(capsys, "ddt", str(tiny_model_dir), *data, "--split", "dev")
    assert code == 2 and 'Unknown split "dev"' in err and "Traceback" not in err


def test_train_ends_by_saying_how_much_entropy_it_kept_and_how_far_it_drifted(tmp_path, tiny_model_dir, capsys):
    recipe = make_recipe(
        tmp_path, tiny_model_dir, objective={"kind": "psft", "old_policy": "base"}, train={"lr": 5e-2, "max_steps": 6}
    )
    code, _, err = run_cli(capsys, "train", str(recipe))
    assert code == 0, err
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    start = sum(r["entropy"] for r in steps[:5]) / 5
    end = sum(r["entropy"] for r in steps[-5:]) / 5
    assert (
        f"entropy on trained tokens: {start:.3f} over the first steps → {end:.3f} over the last (kept "
        f"{end / start:.0%})" in err
    )
    assert f"drift from the base: {steps[-1]['drift']:+.2f} nats at step 6" in err  # psft base: measured every step


def test_env_reports_versions_hardware_and_4bit_without_leaking_tokens(capsys, monkeypatch):
    import importlib.metadata

    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    code, out, _ = run_cli(capsys, "env")
    assert code == 0
    assert f"- torch: {importlib.metadata.version('torch')}" in out
    assert f"- transformers: {importlib.metadata.version('transformers')}" in out
    assert "- 4-bit NF4 on cpu: works" in out  # bitsandbytes runs NF4 on the CPU
    assert "HF_TOKEN: set" in out and "hf_secret_value" not in out
    assert f"wandb {importlib.metadata.version('wandb')}" in out and "lm_eval " in out  # the extras, for tracker bugs
    code, out, _ = run_cli(capsys, "env", "--json")
    info = json.loads(out)
    assert (
        code == 0 and info["versions"]["peft"] == importlib.metadata.version("peft") and info["cores"] == os.cpu_count()
    )


def test_generate_file_writes_one_json_line_per_prompt(tmp_path, tiny_model_dir, capsys):
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": "What is 2 + 2?"}, {"messages": [{"role": "user", "content": "Say hi."}]}],
    )
    code, out, err = run_cli(
        capsys, "generate", str(tiny_model_dir), "--file", str(prompts), "--max-new-tokens", "4", "--dtype", "fp32"
    )
    assert code == 0, err
    rows = [json.loads(x) for x in out.strip().splitlines()]
    assert [r["prompt"] for r in rows] == ["What is 2 + 2?", "Say hi."]
    assert all(isinstance(r["generation"], str) and isinstance(r["finished"], bool) for r in rows)
    code, _, err = run_cli(capsys, "generate", str(tiny_model_dir), "--file", str(prompts), "-p", "both")
    assert code == 2 and "either --prompt" in err


def test_chat_keeps_the_conversation_resets_it_and_exits(tiny_model_dir, capsys, monkeypatch):
    from psft_lite.inference import generate as gen

    seen: list[list[dict]] = []

    def reply(loaded, messages, *a, **k):
        seen.append([dict(m) for m in messages])
        return f"reply {len(seen)}"

    monkeypatch.setattr(gen, "chat_reply", reply)
    lines = iter(["hello", "again", "  ", "/reset", "fresh", "/exit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code, _, err = run_cli(capsys, "chat", str(tiny_model_dir), "--system", "Be brief.", "--dtype", "fp32")
    assert code == 0 and "chatting with" in err
    assert [m["content"] for m in seen[1]] == ["Be brief.", "hello", "reply 1", "again"]  # the history is kept
    assert [m["content"] for m in seen[2]] == ["Be brief.", "fresh"]  # /reset keeps only the system message
    assert len(seen) == 3 and next(lines) == "never read"  # the blank line asked nothing; /exit ended the loop


def test_validate_deep_loads_the_model_and_times_one_step(tmp_path, tiny_model_dir, capsys):
    recipe = make_recipe(tmp_path, tiny_model_dir)
    code, out, err = run_cli(capsys, "validate", str(recipe), "--deep")
    assert code == 0, err
    deep = next(line for line in out.splitlines() if line.strip().startswith("deep"))
    assert re.search(r"one micro-step [\d.]+ s, peak \d+ MB, [\d,]+ trainable parameters", deep), deep
    assert "memory    ~" in out and not (tmp_path / "run").exists()  # validate writes nothing


def test_an_unreachable_hub_is_one_message_within_seconds(tmp_path, capsys, monkeypatch):
    """No retries with back-off: the hub's host is asked once, briefly, and the error says what to do."""
    import time

    from psft_lite.core import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    for var in hub.PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    hub.unreachable_reason.cache_clear()
    recipe = make_recipe(tmp_path, "someone/not-cached-model")
    t0 = time.perf_counter()
    code, _, err = run_cli(capsys, "train", str(recipe))
    hub.unreachable_reason.cache_clear()
    assert code == 2 and time.perf_counter() - t0 < 15
    assert "not in the local Hugging Face cache" in err and "hub.invalid is not reachable" in err
    assert "Retry" not in err and "Traceback" not in err and err.count("error:") == 1
