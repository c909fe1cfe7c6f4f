"""eval, generate, ddt, plot, preflight and in-training eval."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from rich.console import Console

from psft_lite.data.tokenize import Example
from psft_lite.inference.ddt import summarize, token_phi
from psft_lite.inference.evaluate import answers_match, eval_items, evaluate_set, extract_answer, normalize
from psft_lite.inference.generate import generate, load_model
from psft_lite.recipe.schema import DataSection, load_recipe
from psft_lite.training import trainer
from psft_lite.training.build import build
from psft_lite.training.loop import train_loop

from conftest import ARITH, QUIET, ROOT, arith_rows, make_recipe, write_jsonl


@pytest.mark.parametrize(
    "text,expected",
    [
        ("So she has 26 - 16 = 10 marbles.\n#### 10", "10"),
        ("#### 1,234", "1234"),
        ("The answer is #### $18.00", "18"),
        ("#### 7 apples.", "7"),
        ("Thus the total is \\boxed{42}.", "42"),
        ("\\boxed{\\frac{3}{4}}", "3/4"),
        ("We get \\boxed{1{,}000}", "1000"),  # LaTeX's {,} thousands separator
        ("It costs 12 dollars, then 3 more, so 15 dollars", "15"),
        ("first 2.50 then -3", "-3"),
        ("no digits here", None),
        ("#### -5", "-5"),
        ("\\boxed{x^{2}+1} and later 7", "x^{2}+1"),
    ],
)
def test_answer_extraction(text, expected):
    assert extract_answer(text) == expected


def test_answer_matching_and_normalisation():
    assert normalize("1,000.50 dollars") == "1000.5"
    assert normalize("$18.00") == "18" and normalize("25%") == "25"
    assert answers_match("18", "18.0") and answers_match("0.75", "3/4") and not answers_match("17", "18")
    assert not answers_match(None, "1")


def test_gold_answers_come_from_the_answer_column_or_the_reference(tmp_path):
    items = eval_items(
        DataSection(train=str(ARITH / "test.jsonl")).train[0], DataSection(train=str(ARITH / "test.jsonl")), limit=3
    )
    assert all(it.gold == extract_answer(it.reference) for it in items)
    f = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "2+2?", "answer": "2+2=4\n#### 4"}])  # GSM8K columns
    d = DataSection(train=str(f))
    (it,) = eval_items(d.train[0], d)
    assert it.gold == "4" and it.prompt == [{"role": "user", "content": "2+2?"}]


def test_a_right_answer_scores_right_and_a_wrong_one_wrong_end_to_end(tiny_model_dir, monkeypatch):
    """Through evaluate_sets as every caller uses it: the model's answers (replaced by known texts) are extracted,
    compared with the gold answers and counted; the reference NLL still comes from the model."""
    from psft_lite.inference import evaluate as ev
    from psft_lite.inference.generate import Generation

    loaded = load_model(tiny_model_dir, "fp32")
    d = DataSection(train=str(ARITH / "test.jsonl"))
    items = eval_items(d.train[0], d, limit=4)
    answers = [
        items[0].reference,  # the reference solution itself: right
        f"The answer is \\boxed{{{items[1].gold}}}.",  # right, in the other answer format
        f"#### {int(items[2].gold) + 1}",  # off by one: wrong
        "I do not know.",  # no answer: wrong
    ]
    fake = iter([Generation(a, 5, True, 0.5) for a in answers])
    monkeypatch.setattr(ev, "generate", lambda loaded, prompts, *a, **k: [next(fake) for _ in prompts])
    summaries, preds = ev.evaluate_sets(loaded, {"arith": items}, max_new_tokens=8)
    assert [p["correct"] for p in preds["arith"]] == [True, True, False, False]
    assert summaries["arith"]["accuracy"] == 0.5 and preds["arith"][3]["extracted"] is None
    assert math.isfinite(summaries["arith"]["mean_nll"])

    fake = iter([Generation(a, 5, True, 0.5) for a in answers * 2])
    named, _ = ev.evaluate_sets(loaded, {"arith": items, "other": items}, max_new_tokens=8, nll=("other",))
    assert "mean_nll" not in named["arith"] and named["other"]["mean_nll"] == summaries["arith"]["mean_nll"]


def test_eval_end_to_end_writes_summary_and_predictions(tmp_path, tiny_model_dir):
    from psft_lite.inference.evaluate import write_outputs

    loaded = load_model(tiny_model_dir, "fp32")
    d = DataSection(train=str(ARITH / "test.jsonl"))
    items = eval_items(d.train[0], d, limit=3)
    summary, preds = evaluate_set(loaded, items, max_new_tokens=8, batch_size=2)
    # correctness read independently: the gold answer from the file's own column, the last number of the generation
    rows = [json.loads(x) for x in (ARITH / "test.jsonl").read_text().splitlines()[:3]]
    for row, p in zip(rows, preds):
        numbers = re.findall(r"-?\d+", p["generation"].replace(",", ""))
        assert p["gold"] == row["answer"] and p["correct"] == bool(numbers and numbers[-1] == row["answer"])
    assert summary["n"] == 3 and summary["mean_entropy"] > 0
    # the reference NLL against a plain transformers forward over each templated conversation
    tok, total, count = loaded.tokenizer, 0.0, 0
    for row in rows:
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        ids = tok(prompt + row["completion"] + "<|im_end|>", add_special_tokens=False, return_tensors="pt").input_ids
        start = len(tok(prompt, add_special_tokens=False).input_ids)
        with torch.no_grad():
            logp = torch.log_softmax(loaded.model(ids).logits[0, :-1].double(), -1)
        targets = ids[0, 1:]
        total -= float(logp[torch.arange(start - 1, len(targets)), targets[start - 1 :]].sum())
        count += len(targets) - (start - 1)
    assert summary["mean_nll"] == pytest.approx(total / count, rel=1e-4)
    write_outputs(tmp_path / "ev", {"test": summary}, {"test": preds})
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["test"]["n"] == 3
    rows = [json.loads(x) for x in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and {"prompt", "generation", "extracted", "gold", "correct"} <= set(rows[0])


def test_generate_agrees_for_run_dir_and_merged_folder(tmp_path, tiny_model_dir):
    from psft_lite.exporting.merge import merge

    recipe = load_recipe(make_recipe(tmp_path, tiny_model_dir, train={"max_steps": 3, "lr": 5e-2}))
    trainer.run(recipe, console=QUIET)
    merge(tmp_path / "run", console=QUIET)
    prompt = [[{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many?"}]]
    via_run = generate(load_model(tmp_path / "run"), prompt, max_new_tokens=10)[0]
    via_merged = generate(load_model(tmp_path / "run" / "merged"), prompt, max_new_tokens=10)[0]
    via_base = generate(load_model(tiny_model_dir), prompt, max_new_tokens=10)[0]
    assert via_run.text == via_merged.text
    assert via_run.text != via_base.text  # the adapter changed what the model writes


@pytest.mark.slow
def test_ddt_phi_is_zero_on_own_samples_and_negative_on_shuffled_text(embedded_dir):
    """E_{y~p}[log p(y) + H(p)] = 0 exactly; shuffling the same tokens makes them off-distribution."""
    loaded = load_model(embedded_dir, "fp32")
    tok = loaded.tokenizer
    prompts = [
        [{"role": "user", "content": q}]
        for q in (
            "Tell me about the moon.",
            "What is a good breakfast?",
            "Describe a cat.",
            "How do plants grow?",
            "Why is the sky blue?",
            "Write about rain.",
            "What is music?",
            "Explain friendship.",
        )
    ]
    torch.manual_seed(0)
    examples = []
    tok.padding_side = "left"
    enc = tok(
        [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts],
        add_special_tokens=False,
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = loaded.model.generate(
            **enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=48, pad_token_id=tok.pad_token_id
        )
    tok.padding_side = "right"
    rng = np.random.default_rng(0)
    shuffled = []
    for row in range(len(prompts)):
        prompt_ids = enc["input_ids"][row][enc["attention_mask"][row].bool()].numpy()
        gen = out[row, enc["input_ids"].shape[1] :].numpy()
        if tok.eos_token_id in gen:
            gen = gen[: list(gen).index(tok.eos_token_id) + 1]
        ids = np.concatenate([prompt_ids, gen]).astype(np.int32)
        mask = np.zeros(len(ids), dtype=bool)
        mask[len(prompt_ids) :] = True
        examples.append(Example(ids, mask, f"sample {row}"))
        shuffled.append(
            Example(np.concatenate([prompt_ids, rng.permutation(gen)]).astype(np.int32), mask, f"shuffled {row}")
        )
    own = summarize(token_phi(loaded.model, examples, tok.pad_token_id, loaded.device, loaded.dtype))
    off = summarize(token_phi(loaded.model, shuffled, tok.pad_token_id, loaded.device, loaded.dtype))
    assert own["tokens"] > 200
    assert abs(own["mean_phi"]) < 0.25, own["mean_phi"]  # std of φ ≈ 1.5 → standard error ≈ 0.1 here
    assert off["mean_phi"] < -2.0, off["mean_phi"]
    assert own["verdict"].startswith(("in-distribution", "near")) and off["verdict"].startswith("off-distribution")


@pytest.mark.slow
def test_in_training_eval_logs_events_and_leaves_the_trajectory_unchanged(tmp_path, tiny_model_dir):
    common = {"train": {"max_steps": 4, "lr": 2e-2}, "lora": {"dropout": 0.1}}
    test_file = str(write_jsonl(tmp_path / "held_out.jsonl", arith_rows(16, "test")))  # 16 problems score quickly
    # build + train one run after the other: dropout draws from the global torch RNG, which build() seeds
    plain = build(load_recipe(make_recipe(tmp_path / "a", tiny_model_dir, data={"eval": test_file}, **common)), QUIET)
    trainer.prepare_run_dir(plain)
    a = train_loop(plain)
    with_eval = build(
        load_recipe(
            make_recipe(
                tmp_path / "b",
                tiny_model_dir,
                data={"eval": test_file},
                eval={"every": 2, "samples": 2, "max_new_tokens": 4},
                **common,
            )
        ),
        QUIET,
    )
    trainer.prepare_run_dir(with_eval)
    b = train_loop(with_eval)
    assert [x["loss"] for x in a] == [x["loss"] for x in b]  # eval (generation, eval mode) did not disturb training
    events = [json.loads(x) for x in (with_eval.run_dir / "metrics.jsonl").read_text().splitlines() if '"event"' in x]
    assert [e["step"] for e in events] == [2, 4]
    assert all(e["event"] == "eval" and e["eval_loss"] > 0 and 0 <= e["eval_accuracy"] <= 1 for e in events)


def test_plot_overlays_runs(tmp_path, tiny_model_dir):
    from psft_lite.study.plot import plot_runs

    for kind, objective in (("sft", {"kind": "sft"}), ("psft", {"kind": "psft", "old_policy": "snapshot"})):
        r = build(
            load_recipe(make_recipe(tmp_path / kind, tiny_model_dir, objective=objective, train={"max_steps": 3})),
            QUIET,
        )
        trainer.prepare_run_dir(r)
        train_loop(r)
    report = plot_runs([tmp_path / "sft" / "run", tmp_path / "psft" / "run"], tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    series = report["series"]
    assert set(series["run (sft)"]) == {"loss", "nll", "entropy"}
    assert {"clip_frac", "approx_kl", "entropy"} <= set(series["run (psft-snapshot)"])
    colors = report["colors"]  # a run keeps its colour in panels other runs lack (clip_frac is psft-only)
    assert all(len(c) == 1 for c in colors.values()) and colors["run (sft)"] != colors["run (psft-snapshot)"]


def test_preflight_flags_pad_eos_and_a_recipe_that_trains_nothing(tmp_path, tiny_model_dir):
    from psft_lite.core.errors import DataError
    from psft_lite.training.preflight import run_preflight

    console = Console(record=True, width=200)
    rep = run_preflight(load_recipe(make_recipe(tmp_path, tiny_model_dir)), console)
    assert any("pad token = eos token" in n for n in rep.notes)
    assert rep.stats["examples"] == 16 and 0 < rep.stats["trained_share"] < 1
    assert rep.memory is not None and rep.memory.total > 0 and rep.memory.fits
    assert "#### " in console.export_text()  # rendered examples
    with pytest.raises(DataError, match="none of its 16 examples fit"):
        run_preflight(
            load_recipe(make_recipe(tmp_path, tiny_model_dir, data={"max_length": 30, "truncation": "truncate"})),
            console,
        )


def test_the_new_format_task_scores_only_answers_written_in_the_taught_format():
    d = DataSection(train=str(ARITH / "format_test.jsonl"))
    items = eval_items(d.train[0], d, limit=3)
    assert all(it.match == "format" and it.pattern == "[[answer: {answer}]]" for it in items)
    it = items[0]
    assert it.correct(f"Some steps.\n[[answer: {it.gold}]]") == (f"[[answer: {it.gold}]]", True)
    assert not it.correct(f"Some steps.\n#### {it.gold}")[1]  # right number, old format: not what was taught
    assert not it.correct(f"[[answer: {int(it.gold) + 1}]]")[1]  # taught format, wrong number
    assert it.correct(it.reference)[1]  # the reference itself is written in the format
    # told apart: the format learned, and the problem solved whatever the format
    assert it.format_scores(f"Some steps.\n#### {it.gold}") == (False, True)
    assert it.format_scores(f"[[answer: {int(it.gold) + 1}]]") == (True, False)
    assert it.format_scores(it.reference) == (True, True)
    plain = eval_items(
        DataSection(train=str(ARITH / "test.jsonl")).train[0], DataSection(train=str(ARITH / "test.jsonl"))
    )
    assert [p.prompt for p in plain] == [p.prompt for p in eval_items(d.train[0], d)]  # the same held-out problems


def test_a_set_of_the_base_models_own_answers_is_scored_teacher_forced_and_nothing_is_generated(tiny_model_dir):
    from psft_lite.inference.evaluate import evaluate_sets

    d = DataSection(train=str(ROOT / "data" / "retention" / "base.jsonl"))
    items = eval_items(d.train[0], d, limit=10)
    loaded = load_model(tiny_model_dir, "fp32")
    summaries, preds = evaluate_sets(loaded, {"retention": items}, max_new_tokens=4)
    sm = summaries["retention"]
    assert preds["retention"] == [] and sm["rows"] == 10 and len(sm["kl_rows"]) == 10
    assert sm["kl_to_base"] == 0.0 and math.isfinite(sm["mean_nll"]) and sm["mean_nll"] > 0  # no adapter: the base


def test_eval_final_says_accuracy_before_and_after_the_kl_and_the_general_ability_verdict(
    tmp_path, tiny_model_dir, capsys, monkeypatch
):
    """The end of `train` with `[eval] final`: accuracy before → after on each set, the KL on a set of the base's own
    answers, and the verdict on the retention suite (here a 30-item slice of it, for time) with every item written."""
    from psft_lite.inference import retention as ret

    from conftest import run_cli

    monkeypatch.setenv("PSFT_LITE_HOME", str(tmp_path / "home"))
    suite = ret.load_suite()
    monkeypatch.setattr(ret, "load_suite", lambda path=None, kinds=(): suite[::40])
    retention = ROOT / "data" / "retention" / "base.jsonl"
    recipe = make_recipe(
        tmp_path,
        tiny_model_dir,
        eval={
            "sets": {"in_domain": str(ARITH / "test.jsonl"), "retention": str(retention)},
            "final": True,
            "final_limit": 4,
            "max_new_tokens": 4,
        },
    )
    code, out, err = run_cli(capsys, "train", str(recipe))
    assert code == 0, err
    folder = tmp_path / "run" / "eval"
    final = json.loads((folder / "final.json").read_text())
    before, after = final["in_domain"]["before"], final["in_domain"]["after"]
    assert before["n"] == after["n"] == 4 and "before" not in final["retention"]
    assert f"in_domain accuracy: {before['accuracy']:.1%} → {after['accuracy']:.1%} (4 held-out problems)" in err
    kl = final["retention"]["after"]
    assert kl["rows"] == 4 and kl["kl_to_base"] > 0  # the adapter moved the model
    assert f"retention: KL to the base {kl['kl_to_base']:.3f} nats/token on its own answers to 4 prompts" in err
    verdict = json.loads((folder / "retention.json").read_text())
    assert verdict == {k: v for k, v in final["general_ability"].items() if k != "lines"}
    items = [json.loads(x) for x in (folder / "retention-items.jsonl").read_text().splitlines()]
    assert verdict["overall"]["n"] == len(items) == len(suite[::40])
    assert {"id", "kind", "before", "after", "answer_before", "answer_after"} <= set(items[0])
    assert re.search(
        r"general ability: [\d.]+ % → [\d.]+ % \([+-][\d.]+ \[[+-][\d.]+, [+-][\d.]+\] points on "
        rf"{len(items)} items; \d+ right→wrong, \d+ wrong→right\)",
        err,
    ), err


def test_retention_scores_in_one_pass_equal_the_separate_nll_and_kl_and_a_cache_changes_nothing(tiny_model_dir):
    """The study's retention scoring (one adapter forward, the adapter-off forward cached across checkpoints) gives
    the NLL the separate teacher-forced scoring gives, and the KL rows `kl_rows` gives, row by row."""
    import torch
    from peft import LoraConfig, get_peft_model

    from psft_lite.inference.evaluate import kl_rows, reference_nll, retention_scores
    from psft_lite.inference.generate import Loaded

    d = DataSection(train=str(ROOT / "data" / "retention" / "base.jsonl"))
    items = eval_items(d.train[0], d, limit=11)  # two batches, the second one short
    plain = load_model(tiny_model_dir, "fp32")
    torch.manual_seed(0)
    model = get_peft_model(plain.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    loaded = Loaded(model.eval(), plain.tokenizer, "tiny+adapter", plain.device, torch.float32, adapter=tiny_model_dir)
    cache: dict = {}
    first = retention_scores(loaded, items, cache)
    rows = kl_rows(loaded, items)
    assert [n for _, n in first["kl_rows"]] == [n for _, n in rows]
    assert [s for s, _ in first["kl_rows"]] == pytest.approx([round(s, 6) for s, _ in rows], abs=2e-6)
    assert min(s for s, _ in rows) > 0  # the random adapter moved every row
    assert first["mean_nll"] == pytest.approx(reference_nll(loaded, items), rel=1e-5)
    assert len(cache) == 2
    assert retention_scores(loaded, items, cache) == first  # read from the cache: the same numbers


def test_generation_gives_the_lm_head_a_contiguous_input(tiny_model_dir):
    """generate scores only the last position (a strided [B, 1, H] view); PyTorch's CPU bf16 linear on such an input
    materialises the head's weight once per row (Gemma 3 270M, 20 prompts: 7.8 GB peak instead of 2.0 GB). Every
    model psft-lite loads hands its head a contiguous input, and the answers are the same."""
    loaded = load_model(tiny_model_dir, "bf16")
    seen: list[bool] = []
    head = loaded.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].is_contiguous()))
    msgs = [[{"role": "user", "content": r["prompt"]}] for r in arith_rows(3, "test")]
    first = [g.text for g in generate(loaded, msgs, 4, 0.0, 1.0, 3)]
    assert seen and all(seen), seen
    handle.remove()
    head._forward_pre_hooks.clear()  # without the fix: the same answers, from a strided input
    assert [g.text for g in generate(loaded, msgs, 4, 0.0, 1.0, 3)] == first


def test_greedy_that_drops_finished_rows_equals_transformers_generate(embedded_dir):
    """psft-lite's greedy decoder drops a row (and its KV cache) once it ends its turn; tokens, lengths, 'finished' and
    the per-token entropies equal transformers' generate on the same batch, with rows ending at different steps. A
    model whose generation config changes greedy's scores (a repetition penalty) goes through transformers."""
    from psft_lite.inference import generate as gen

    loaded = load_model(embedded_dir, "fp32")
    tok = loaded.tokenizer
    tok.padding_side = "left"
    msgs = [[{"role": "user", "content": r["prompt"]}] for r in arith_rows(6, "test")]
    enc = tok([gen.render_prompt(tok, m) for m in msgs], add_special_tokens=False, padding=True, return_tensors="pt")
    free = gen.greedy(loaded.model, enc["input_ids"], enc["attention_mask"], 12, ends=[])

    def first_stops(t: int) -> set[int]:  # the step at which each row would end if t ended a turn (12: never)
        return {ids.index(t) if t in ids else 12 for ids, _ in free}

    # the stop token that ends the rows at the most different steps
    ends = [max({t for ids, _ in free for t in ids}, key=lambda t: len(first_stops(t)))]
    pruned = gen.greedy(loaded.model, enc["input_ids"], enc["attention_mask"], 12, ends)
    hf = gen._hf_generate(loaded, enc, 12, 0.0, 1.0, ends)
    lengths = set()
    for (p_ids, p_ent), (h_ids, h_ent) in zip(pruned, hf):
        stop = next((i + 1 for i, t in enumerate(h_ids) if t in ends), len(h_ids))
        assert p_ids == h_ids[:stop] and p_ent == pytest.approx(h_ent[:stop], abs=1e-5)
        lengths.add(len(p_ids))
    assert len(lengths) >= 3  # rows really ended at different steps (and some ran to the limit)
    assert gen.plain_greedy(loaded.model)
    loaded.model.generation_config.repetition_penalty = 1.3
    assert not gen.plain_greedy(loaded.model)
