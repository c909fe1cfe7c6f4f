"""Hinted Decoding (METHODS.md §5): mixing, sampling, hand-off, stopping, resume, and the output as training data."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from psft_lite.data import load_examples
from psft_lite.data.sources import read_rows
from psft_lite.inference.generate import load_model
from psft_lite.inference.hinted import (
    HintConfig,
    StopAtCoT,
    cut_at_cot,
    decode,
    mix_step,
    nucleus,
    prompt_ids,
    repeating,
    run,
    sample,
)
from psft_lite.recipe.schema import DataSection

from conftest import arith_rows, write_jsonl


def test_one_mixing_step_by_hand():
    lp = torch.log(torch.tensor([0.7, 0.1, 0.1, 0.1]))
    lq = torch.log(torch.tensor([0.1, 0.6, 0.2, 0.1]))
    h = -(0.7 * math.log(0.7) + 3 * 0.1 * math.log(0.1))  # 0.9404 nats
    lam_expected = min(1.0, 2.0 * h / math.log(4))  # β = 2: 1.3568 → clamped to 1
    scores, lam = mix_step(lp, lq, beta=2.0, first=False, handed_off=False)
    assert lam == lam_expected == 1.0 and torch.allclose(scores, lq)
    scores, lam = mix_step(lp, lq, beta=1.0, first=False, handed_off=False)
    assert abs(lam - h / math.log(4)) < 1e-6  # 0.6784
    torch.testing.assert_close(scores, (1 - lam) * lp + lam * lq)
    assert mix_step(lp, lq, 3.0, first=True, handed_off=False) == (lp, 0.0)  # first token: p alone
    assert mix_step(lp, lq, 3.0, first=False, handed_off=True)[1] == 1.0  # after the marker: q alone


def test_nucleus_then_temperature_by_hand():
    scores = torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3]))
    kept, probs = nucleus(scores, top_p=0.7, temperature=0.5)
    # nucleus: 0.5 (cum 0 < 0.7), 0.3 (cum 0.5 < 0.7); 0.15 has cum 0.8 → out. temperature 0.5 squares: 0.25 : 0.09
    assert kept.tolist() == [1, 3]
    torch.testing.assert_close(probs, torch.tensor([0.25 / 0.34, 0.09 / 0.34]))
    assert sample(scores, 0.7, 0.0, torch.Generator()) == 1  # temperature 0 is greedy


def test_repetition_detector():
    loop = [1, 2, 3, 4, 5, 6] * 30
    assert repeating([9] * 10 + loop, window=30, count=5)
    assert not repeating(list(range(200)), window=30, count=5)


def test_beta_zero_ignores_the_plain_stream(tiny_model_dir):
    """β = 0 gives λ = 0 at every step: whatever the plain stream says, the same seed gives the same tokens."""
    loaded = load_model(tiny_model_dir, "fp32")
    hinted = prompt_ids(loaded, [{"role": "user", "content": "Explain 2 + 2 with the answer 4."}], "# CoT\n")
    plain_a = prompt_ids(loaded, [{"role": "user", "content": "What is 2 + 2 here?"}])
    plain_b = plain_a[:-9] + [100, 200, 300, 400] + plain_a[-5:]  # other words, same length: same padding for p
    cfg = HintConfig(beta=0.0, temperature=0.7, top_p=0.95, max_new_tokens=24, answer_marker="")
    a, b = decode(loaded, hinted, plain_a, cfg, seed=11), decode(loaded, hinted, plain_b, cfg, seed=11)
    assert a.tokens == b.tokens and all(lam == 0.0 for lam in a.lambdas + b.lambdas)
    with_q = decode(
        loaded, hinted, plain_a, HintConfig(beta=50.0, temperature=0.7, max_new_tokens=24, answer_marker=""), seed=11
    )
    assert with_q.tokens != a.tokens and max(with_q.lambdas) == 1.0  # β > 0 does let q in


@pytest.mark.slow
def test_beta_zero_is_the_hinted_stream_alone_and_kv_cache_equals_recompute(embedded_dir):
    """On the real model: two-stream incremental decoding at β = 0 equals sampling from the hinted prompt alone,
    recomputed from scratch each step; and for β > 0 the KV-cache path equals full recomputation."""
    loaded = load_model(embedded_dir, "fp32")
    hinted = prompt_ids(
        loaded, [{"role": "user", "content": "Tom has 3 apples and buys 4 more. Reference: 3 + 4 = 7."}], "# CoT\n"
    )
    plain = prompt_ids(loaded, [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many?"}])
    cfg = HintConfig(beta=0.0, temperature=0.3, top_p=0.95, max_new_tokens=12, answer_marker="")
    d = decode(loaded, hinted, plain, cfg, seed=11)
    gen = torch.Generator().manual_seed(11)
    ids, ref = list(hinted), []
    with torch.no_grad():
        for _ in range(12):
            lp = torch.log_softmax(loaded.model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
            t = sample(lp, 0.95, 0.3, gen)
            if t == loaded.tokenizer.eos_token_id:
                break
            ids.append(t)
            ref.append(t)
    assert d.tokens == ref
    cfg3 = HintConfig(beta=3.0, temperature=0.3, max_new_tokens=12, answer_marker="")
    assert (
        decode(loaded, hinted, plain, cfg3, seed=5).tokens
        == decode(loaded, hinted, plain, cfg3, seed=5, incremental=False).tokens
    )


class Scripted(torch.nn.Module):
    """A stand-in model: row 0 (hinted) always predicts script_p[k], row 1 (plain) script_q[k], k = tokens so far."""

    def __init__(self, prompt_len, script_p, script_q, vocab):
        super().__init__()
        self.n, self.sp, self.sq, self.v = prompt_len, script_p, script_q, vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        k = input_ids.shape[1] - self.n
        logits = torch.full((2, input_ids.shape[1], self.v), -30.0)
        logits[0, -1, self.sp[min(k, len(self.sp) - 1)]] = 30.0
        logits[1, -1, self.sq[min(k, len(self.sq) - 1)]] = 30.0
        return SimpleNamespace(logits=logits, past_key_values=None)


def _scripted(tokenizer, script_p, script_q):
    model = Scripted(4, script_p, script_q, len(tokenizer))
    return SimpleNamespace(model=model, tokenizer=tokenizer, device=torch.device("cpu"), dtype=torch.float32)


def test_hand_off_to_the_plain_stream_after_the_answer_marker(tokenizer):
    ids = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    p_script = ids("So the total is 5.\n#### 5 and more from p")
    q_script = ids("Q" * 40)
    marker_end = len(ids("So the total is 5.\n####"))
    loaded = _scripted(tokenizer, p_script, q_script)
    cfg = HintConfig(beta=0.0, temperature=0.0, max_new_tokens=marker_end + 3, answer_marker="####")
    d = decode(loaded, [1, 2, 3, 4], [5, 6, 7, 8], cfg, seed=0, incremental=False)
    assert d.handoff == marker_end
    assert d.tokens[:marker_end] == p_script[:marker_end]  # β = 0: p dictates until the marker
    assert d.tokens[marker_end:] == [q_script[k] for k in range(marker_end, marker_end + 3)]  # then q alone
    assert d.lambdas[marker_end - 1 :] == [1.0] * 3  # lambdas start at the second token (the first is p alone)


def test_repetition_stops_decoding(tokenizer):
    loop = tokenizer("one two three four five six", add_special_tokens=False)["input_ids"]
    script = (loop * 100)[:600]
    loaded = _scripted(tokenizer, script, script)
    d = decode(
        loaded,
        [1, 2, 3, 4],
        [5, 6, 7, 8],
        HintConfig(temperature=0.0, max_new_tokens=500, answer_marker=""),
        seed=0,
        incremental=False,
    )
    assert d.finish == "repetition" and len(d.tokens) < 500


def test_run_writes_training_data_resumes_and_repairs_a_torn_line(tmp_path, tiny_model_dir):
    loaded = load_model(tiny_model_dir, "fp32")
    src = write_jsonl(tmp_path / "in.jsonl", arith_rows(3))
    data = DataSection(train=str(src))
    out = tmp_path / "hinted.jsonl"
    cfg = HintConfig(max_new_tokens=6, hint_max_tokens=6, cot_fallback=True)
    first = run(loaded, read_rows(data.train[0], limit=2), data, out, cfg, keep="all")
    assert first["kept"] == 2 and first["decoded"] == 2 and first["mean_phi_hinted"] is not None
    lines = out.read_text().splitlines()
    out.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # killed while writing line 2
    again = run(loaded, read_rows(data.train[0]), data, out, cfg, keep="all")
    assert again["skipped_done"] == 1 and again["kept"] == 3 and again["decoded"] == 3  # the summary covers all 3
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 3 and len({r["hint_id"] for r in rows}) == 3
    assert {"prompt", "completion", "hint_phi", "hint_reference_phi", "hint_lambda_mean", "hint_finish"} <= set(rows[0])
    # trains directly
    examples, stats = load_examples(DataSection(train=str(out)).train[0], DataSection(train=str(out)), loaded.tokenizer)
    assert stats.kept == 3
    # the same seed gives the same rewrites
    out2 = tmp_path / "again.jsonl"
    run(loaded, read_rows(data.train[0]), data, out2, cfg, keep="all")
    assert [json.loads(x)["completion"] for x in out2.read_text().splitlines()] == [r["completion"] for r in rows]
    # keep=correct sends wrong answers to the dropped file
    out3 = tmp_path / "strict.jsonl"
    s = run(loaded, read_rows(data.train[0]), data, out3, cfg, keep="correct")
    dropped = [json.loads(x) for x in (tmp_path / "strict.dropped.jsonl").read_text().splitlines()]
    assert s["kept"] + s["unfinished"] + s["wrong_answer"] == 3 and len(dropped) == s["unfinished"] + s["wrong_answer"]
    for r in dropped:  # 6 new tokens cannot finish: unfinished first, wrong answer only for finished ones
        assert r["hint_dropped"] == ("unfinished" if r["hint_finish"] != "eos" else "wrong_answer")
    assert all(r["hint_finish"] == "eos" and r["hint_correct"] for r in map(json.loads, out3.read_text().splitlines()))


@pytest.mark.parametrize("heading", ["# CoT", "#### CoT", "## cot:", "### CoT  "])
def test_the_cot_heading_at_any_level_stops_the_analysis_and_is_written_as_hash_cot(tokenizer, heading):
    text = f"# Analyze\nStep 1 adds 2 and 3.\n{heading}\nFirst, 2 + 3 = 5"
    assert cut_at_cot(text) == "# Analyze\nStep 1 adds 2 and 3.\n# CoT\n"
    # the greedy analysis stops once the heading's line has ended, not while it may still be "# CoTs"
    start = 2
    stop = StopAtCoT(tokenizer, start)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    cut = len(tokenizer(f"# Analyze\nStep 1 adds 2 and 3.\n{heading}", add_special_tokens=False)["input_ids"])
    flags = [bool(stop(torch.tensor([[0, 0] + ids[:n]]), None)[0]) for n in range(1, len(ids) + 1)]
    assert not any(flags[: cut - 1]) and flags[-1]


def test_no_cot_heading_drops_or_falls_back():
    assert cut_at_cot("# Analyze\nthe answer is #### 5\n") is None  # `#### 5` is an answer, not a heading
    assert cut_at_cot("# Analyze\nsome text", fallback=True) == "# Analyze\nsome text\n\n# CoT\n"
    assert cut_at_cot("# Analyze\n# CoT\nmine\n# CoT\nagain") == "# Analyze\n# CoT\nmine\n# CoT\n"  # the last one


def test_resume_never_truncates_a_file_it_did_not_write_and_ends_a_line_that_lost_its_newline(tmp_path):
    from psft_lite.core.errors import DataError
    from psft_lite.inference.hinted import read_done

    foreign = tmp_path / "mine.jsonl"
    foreign.write_text('{"prompt": "x", "completion": "y"}\n')
    with pytest.raises(DataError, match="mine.jsonl:1: not a line written by psft-lite hint"):
        read_done(foreign)
    assert foreign.read_text() == '{"prompt": "x", "completion": "y"}\n'  # untouched
    torn = tmp_path / "torn.jsonl"
    torn.write_text('{"hint_id": "a"}\n{"hint_id": "b", "comp')
    assert read_done(torn) == {"a"} and torn.read_text() == '{"hint_id": "a"}\n'
    unended = tmp_path / "unended.jsonl"
    unended.write_text('{"hint_id": "a"}\n{"hint_id": "b"}')
    assert read_done(unended) == {"a", "b"} and unended.read_text() == '{"hint_id": "a"}\n{"hint_id": "b"}\n'
    assert read_done(unended) == {"a", "b"} and unended.read_text().count("\n") == 2  # idempotent
