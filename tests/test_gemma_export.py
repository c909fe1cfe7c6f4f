"""Gemma 3 270M merged and exported: an exact merge, and a q8_0 GGUF that passes the llama.cpp check (its own module,
so a test worker can run it beside the training tests of test_gemma.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from psft_lite.model.packaged import GEMMA3
from psft_lite.recipe.schema import load_recipe

from conftest import QUIET, make_recipe


@pytest.fixture(scope="module")
def gemma_run(tmp_path_factory, gemma_dir) -> Path:
    from psft_lite.training import trainer

    tmp = tmp_path_factory.mktemp("gemma-run")
    train = {
        "max_steps": 2,
        "batch_size": 2,
        "micro_batch_size": 2,
        "lr": 1e-3,
        "schedule": "constant",
    }  # fp32: the merge is exact
    recipe = make_recipe(tmp, GEMMA3, train=train, data={"limit": 2})
    summary = trainer.run(load_recipe(recipe), console=QUIET)
    return summary.run_dir


def test_gemma_merge_is_exact(tmp_path, gemma_run):
    from psft_lite.exporting.merge import merge

    report = merge(gemma_run, out=tmp_path / "merged", console=QUIET)  # raises when its own check fails
    assert report["max_abs_dlogit"] < 1e-3 and report["greedy_agreement"] == 1.0, report
    assert (tmp_path / "merged" / "config.json").is_file()


def test_gemma_q8_gguf_passes_the_llama_cpp_check_and_ends_its_answers(tmp_path, gemma_run, monkeypatch):
    import functools

    import gguf

    from psft_lite.exporting import gguf as export_mod

    # 32 greedy tokens instead of 128: this 2-step run does not end its answers, and each token of Gemma's 262k-entry
    # fp32 head costs ~0.2 s on one core in the reference and again in llama.cpp
    monkeypatch.setattr(export_mod, "reference", functools.partial(export_mod.reference, max_new_tokens=32))

    report = export_mod.export(gemma_run, out=tmp_path / "g.gguf", quant="q8_0", console=QUIET)
    c = report["files"][0]["check"]
    assert c["passed"] and c["tokenizer_mismatches"] == 0, c
    # every greedy answer the merged model ends also ends in llama.cpp (this 2-step run rarely ends its answers within
    # the budget; the 80-step recipes/gemma3-arith.toml run ends 3 of 3: README, "Gemma 3 270M")
    assert c["greedy_ended"] == c["greedy_n"], c
    r = gguf.GGUFReader(tmp_path / "g.gguf")
    arch = r.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "gemma3"
    modelfile = (tmp_path / "Modelfile").read_text()
    assert "<start_of_turn>model" in modelfile and 'PARAMETER stop "<end_of_turn>"' in modelfile


def test_an_adapter_on_a_quantized_base_gguf_is_held_to_that_base_types_tolerance(gemma_dir):
    """`export --adapter-only` checks the adapter on the packaged base GGUF as it is: Gemma's is Q4_K_M, so the check
    allows Q4_K_M's noise (a 4-step Gemma adapter measured max |Δlogit| 8.5 on it, over the adapter's own 6.0)."""
    from psft_lite.exporting import gguf_check
    from psft_lite.model import packaged

    gemma, smollm2 = packaged.gguf_path(GEMMA3), packaged.gguf_path("smollm2-135m-instruct")
    assert gguf_check.file_type(gemma) == "q4_k_m" and gguf_check.file_type(smollm2) == "q4_1"
    assert gguf_check.lora_tolerance(gemma) == gguf_check.TOLERANCE["q4_k_m"]
    assert gguf_check.lora_tolerance(smollm2) == gguf_check.TOLERANCE["lora"]  # a type without its own: the adapter's
