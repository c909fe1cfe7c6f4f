"""Merge: the merged folder computes what the adapter model computed, loads without psft-lite, fails loudly."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from psft_lite.core.errors import ModelError, RunError
from psft_lite.exporting import merge as merge_mod
from psft_lite.recipe.schema import load_recipe
from psft_lite.training import trainer

from conftest import QUIET, make_recipe

PROMPT = "Tom has 12 apples and buys 7 more. How many apples does he have?"


def _trained_run(tmp_path, model_dir, **model):
    recipe = load_recipe(make_recipe(tmp_path, model_dir, model=model, train={"max_steps": 3, "lr": 2e-2}))
    summary = trainer.run(recipe, console=QUIET)
    return tmp_path / "run", summary


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """The tiny run of each kind (LoRA, QLoRA), trained once for the module: tests merge it into folders of their
    own and leave the run as they found it."""
    runs: dict[bool, Path] = {}

    def get(load_in_4bit: bool) -> Path:
        if load_in_4bit not in runs:
            folder = tmp_path_factory.mktemp("qlora" if load_in_4bit else "lora")
            runs[load_in_4bit] = _trained_run(folder, tiny_model_dir, load_in_4bit=load_in_4bit)[0]
        return runs[load_in_4bit]

    return get


GENERATE = textwrap.dedent(
    """
    import json, sys
    from transformers import AutoModelForCausalLM, AutoTokenizer
    assert "psft_lite" not in sys.modules
    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    ids = tok.apply_chat_template([{"role": "user", "content": sys.argv[2]}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    print(json.dumps(out[0, ids.shape[1]:].tolist()))
    assert "psft_lite" not in sys.modules
    """
)


def _adapter_greedy(run_dir, model_dir, load_in_4bit):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    kw = (
        {
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32,
            )
        }
        if load_in_4bit
        else {}
    )
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kw), run_dir / "adapter"
    )
    tok = AutoTokenizer.from_pretrained(run_dir / "adapter")
    ids = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    model.eval()
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["lora", "qlora"])
def test_merge_is_exact_and_loads_without_psft_lite(tmp_path, tiny_model_dir, trained, load_in_4bit):
    run_dir = trained(load_in_4bit)
    merged = tmp_path / "merged"
    report = merge_mod.merge(run_dir, out=merged, console=QUIET)
    assert report["out"] == str(merged)
    assert report["max_abs_dlogit"] < 1e-3 and report["greedy_agreement"] == 1.0, report
    files = {p.name for p in merged.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "chat_template.jinja",
    } <= files
    assert not any(n.startswith("adapter") for n in files)
    p = subprocess.run([sys.executable, "-c", GENERATE, str(merged), PROMPT], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == _adapter_greedy(run_dir, tiny_model_dir, load_in_4bit)


def test_naive_merge_into_4bit_weights_would_have_failed_the_check(tmp_path, trained, monkeypatch):
    """The check has teeth: merging into the 4-bit weights (what peers do) loses the delta and is refused."""
    run_dir = trained(True)
    from peft import PeftModel

    from psft_lite.model import loading

    def naive(info, device, train_dtype, out_dtype, from_original):
        base = loading.load_base_model(info.base, device, train_dtype)
        merged = PeftModel.from_pretrained(base, info.path).merge_and_unload()
        return merged.dequantize()

    monkeypatch.setattr(merge_mod, "merged_model", naive)
    out = tmp_path / "naive"
    with pytest.raises(RunError, match="merge check failed") as e:
        merge_mod.merge(run_dir, out=out, console=QUIET)
    assert "Nothing was written" in str(e.value)
    assert not out.exists()
    assert not any(".tmp-" in p.name for p in tmp_path.iterdir())


def test_recipe_save_merged_merges_at_the_end_of_training(tmp_path, tiny_model_dir):
    recipe = load_recipe(make_recipe(tmp_path, tiny_model_dir, train={"max_steps": 2}, output={"save": "merged"}))
    summary = trainer.run(recipe, console=QUIET)
    merged = tmp_path / "run" / "merged"
    assert summary.merged == merged
    meta = json.loads((merged / "psft_lite.json").read_text())
    assert meta["check"]["max_abs_dlogit"] < 1e-3


def test_bad_merge_inputs(tmp_path, tiny_model_dir, embedded_dir):
    with pytest.raises(ModelError, match="not an adapter"):
        merge_mod.merge(tmp_path, console=QUIET)
    run_dir, _ = _trained_run(tmp_path, tiny_model_dir)
    with pytest.raises(ModelError, match="does not fit the base model"):  # adapter of another architecture
        merge_mod.merge(run_dir, base=str(embedded_dir), out=tmp_path / "x", console=QUIET)
    with pytest.raises(ModelError, match="no such model folder"):
        merge_mod.merge(run_dir, base="./missing/model", out=tmp_path / "y", console=QUIET)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
