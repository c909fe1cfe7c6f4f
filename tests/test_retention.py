"""The general-ability retention suite: its items, its scorers, its statistics and the verdict (psft-lite eval
--retention; the end of train)."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import numpy as np
import pytest
import torch

from psft_lite.core.stats import detectable_drop, mcnemar_exact, paired_change, seed_interval, t_quantile
from psft_lite.inference import retention as ret
from psft_lite.inference.retention import SuiteItem


def test_the_suite_is_large_varied_and_every_item_has_exactly_one_right_answer():
    items = ret.load_suite()  # validates every row: a right choice among distinct options, or a known verifier
    kinds = Counter(it.kind for it in items)
    assert len(items) >= 1000 and len(kinds) >= 8, kinds
    assert len({it.id for it in items}) == len(items)
    for it in items:
        if it.score == "choice":
            assert len(set(it.choices)) == len(it.choices) and 0 <= it.answer < len(it.choices)
        else:
            assert it.check["type"] in ret.VERIFIERS
    # the shipped file is what the seeded generator writes
    from psft_lite.data.suite import build

    assert [json.loads(x) for x in ret.SUITE_FILE.read_text().splitlines()] == build()


def test_no_two_options_of_a_word_item_answer_its_question():
    """Distractors come from other entries of the same list: none is the word's opposite in another pair of its group,
    or a second accepted plural."""
    from psft_lite.data import suite_items as S

    opposite = {a: b for pair in S.OPPOSITES for a, b in (pair, pair[::-1])}
    for it in ret.load_suite():
        if it.kind == "opposite" and it.score == "choice":
            word = re.search(r"'(.+?)'", it.prompt).group(1)
            assert it.choices[it.answer] == opposite[word]
            assert sum(c == opposite[word] for c in it.choices) == 1


@pytest.mark.parametrize(
    "verifier, check, reply, right",
    [
        # short answers: the first sentence names the answer and no other candidate of the closed set
        (
            "names",
            {"answer": "Paris", "candidates": ["Paris", "Rome", "Madrid"]},
            "The capital of France is Paris.",
            True,
        ),
        ("names", {"answer": "Paris", "candidates": ["Paris", "Rome", "Madrid"]}, "Paris or Rome.", False),
        ("names", {"answer": "Paris", "candidates": ["Paris", "Rome", "Madrid"]}, "It is Parisian.", False),
        ("names", {"answer": "Paris", "candidates": ["Paris", "Rome"]}, "France is nice. Its capital is Paris.", False),
        (
            "names",
            {"answer": "lose", "candidates": ["draw", "lose", "positive"]},
            'The opposite of "win" is "lose". It can be positive.',
            True,
        ),  # commentary after the answer is not read
        # numbers: the last number of the first sentence — the substring trap of the old retention set
        ("number", {"answer": "12"}, "365 * 12 = 312 months", False),
        ("number", {"answer": "6"}, "4 + 2 = 6", True),
        ("number", {"answer": "11"}, "To add 7 and 4, we follow the order of operations. First 7 + 4 = 11.", False),
        ("number", {"answer": "1000"}, "The answer is 1,000.", True),
        ("exact", {"answer": "The cat sat on the warm mat."}, '"The cat sat on the warm mat."', True),
        ("exact", {"answer": "The cat sat on the warm mat."}, "The cat sat on the mat.", False),
        ("lines", {"n": 3}, "1. Apple\n2. Pear\n3. Plum", True),
        ("lines", {"n": 3}, "1. Apple\n2. Pear\n\nThese are three fruits that people like to eat.", False),
        ("lines", {"n": 2}, "- **Drums**\n- **Tuba**", True),
        ("no_commas", {"min_words": 4}, "The sea is wide and blue.", True),
        ("no_commas", {"min_words": 4}, "The sea, wide and blue.", False),
        ("no_commas", {"min_words": 4}, "Blue sea.", False),
    ],
)
def test_verifiers_on_hand_written_replies(verifier, check, reply, right):
    item = SuiteItem("x-1", "test", "What is the capital of France?", "check", check={"type": verifier, **check})
    assert ret.VERIFIERS[verifier](reply, item) is right


def test_a_candidate_named_in_the_question_does_not_count_against_the_answer():
    item = SuiteItem(
        "x",
        "t",
        "What is the opposite of 'above'?",
        "check",
        check={"type": "names", "answer": "below", "candidates": ["above", "below", "up"]},
    )
    assert ret.names("The opposite of 'above' is 'below'.", item)
    assert not ret.names("The opposite of 'above' is 'up' or 'below'.", item)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"id": "a", "kind": "k", "prompt": "p", "score": "choice", "choices": ["x", "x"], "answer": 0}, "distinct"),
        ({"id": "a", "kind": "k", "prompt": "p", "score": "choice", "choices": ["x", "y"], "answer": 2}, "index"),
        ({"id": "a", "kind": "k", "prompt": "p", "score": "check", "check": {"type": "nope"}}, "check.type"),
        ({"id": "a", "kind": "k", "prompt": "p", "score": "check", "check": {"type": "lines"}}, "needs n"),
        (
            {
                "id": "a",
                "kind": "k",
                "prompt": "p",
                "score": "check",
                "check": {"type": "names", "answer": "z", "candidates": ["x"]},
            },
            "one of the candidates",
        ),
        ({"id": "a", "kind": "k", "score": "choice"}, "string fields"),
    ],
)
def test_a_bad_suite_row_is_refused_naming_its_line(tmp_path, row, message):
    from psft_lite.core.errors import DataError

    path = tmp_path / "suite.jsonl"
    good = {"id": "g", "kind": "k", "prompt": "p", "score": "choice", "choices": ["x", "y"], "answer": 1}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=rf"suite.jsonl:2: .*{message}"):
        ret.load_suite(path)


def test_retention_kinds_choose_items_and_an_unknown_kind_is_refused_before_the_model_loads(tmp_path, capsys):
    """`eval.retention_kinds` / `--retention-kinds` keep only the named kinds; a kind the suite lacks is one clear
    error naming the key and the suite's kinds (exit 2), with nothing loaded."""
    from psft_lite.core.errors import RecipeError

    from conftest import run_cli

    items = ret.load_suite(kinds=["fact", "science"])
    assert {it.kind for it in items} == {"fact", "science"}
    assert len(items) == sum(it.kind in ("fact", "science") for it in ret.load_suite())
    with pytest.raises(RecipeError, match=r"eval.retention_kinds .*'facts' is not a kind.*its kinds are category, "):
        ret.load_suite(kinds=["facts"])
    code, _, err = run_cli(capsys, "eval", str(tmp_path / "no-such-model"), "--retention", "--retention-kinds", "x")
    assert code == 2 and "'x' is not a kind of the retention suite" in err and "Traceback" not in err


def test_multiple_choice_scores_equal_a_float64_computation_one_option_at_a_time(tiny_model_dir):
    """The packed scorer (every option of an item in one row behind the shared prompt, many items per row) gives the
    log-likelihood a plain float64 forward of each prompt + option gives, option by option."""
    from psft_lite.data.tokenize import encode, special_token_ids
    from psft_lite.inference.generate import load_model

    loaded = load_model(tiny_model_dir, "fp32")
    items = [it for it in ret.load_suite() if it.score == "choice"][::97][:9]
    packed = ret.score_choices(loaded, items, room=160)  # small rows: several rows and batches
    model64 = loaded.model.double()
    special = special_token_ids(loaded.tokenizer)
    for it, scores in zip(items, packed):
        for option, got in zip(it.choices, scores):
            msgs = [{"role": "user", "content": it.prompt}, {"role": "assistant", "content": option}]
            ids, mask, _ = encode(loaded.tokenizer, msgs, it.id, special)
            last = len(mask) - int(mask[::-1].argmax())
            x = torch.tensor(ids[:last], dtype=torch.long)[None]
            with torch.no_grad():
                logp = torch.log_softmax(model64(x).logits[0, :-1].double(), -1)
            want = sum(float(logp[t - 1, ids[t]]) for t in range(last) if mask[t])
            assert got == pytest.approx(want, abs=2e-4), (it.id, option)
    loaded.model.float()


def test_paired_change_on_synthetic_vectors_with_a_known_answer():
    before = np.array([1] * 600 + [0] * 400)
    after = before.copy()
    after[:100] = 0  # 100 right → wrong, nothing else
    c = paired_change(before, after)
    assert (c.before, c.after, c.delta) == (60.0, 50.0, -10.0)
    assert (c.right_to_wrong, c.wrong_to_right) == (100, 0)
    assert c.low < -10 < c.high < 0 and c.beyond(5) and not c.beyond(10)
    # the bootstrap's spread is the paired standard error sqrt(d(1-d)/n) with d = the per-item change
    se = 100 * math.sqrt(0.1 * 0.9 / 1000)
    assert (c.high - c.low) == pytest.approx(2 * 1.96 * se, rel=0.12)
    assert c.p_value == pytest.approx(2 * 0.5**100)
    same = paired_change(before, before)
    assert same.delta == same.low == same.high == 0.0 and same.p_value == 1.0 and same.discordant == 0
    balanced = before.copy()
    balanced[:50], balanced[-50:] = 0, 1  # 50 each way
    b = paired_change(before, balanced)
    assert b.delta == 0.0 and b.low < 0 < b.high and b.p_value == 1.0
    # few discordant items: the percentile bootstrap alone would exclude 0 ([-1.0, -0.1]); the exact test does not
    # reject (p = 0.0625), and the interval, widened to the exact conditional one, contains 0
    few = before.copy()
    few[:5] = 0
    f = paired_change(before, few)
    assert f.delta == -0.5 and f.p_value == 0.0625 and f.low < 0 < f.high
    more = before.copy()
    more[:12] = 0  # p = 0.0005: now both agree that it dropped
    assert paired_change(before, more).high < 0


def test_mcnemar_t_quantiles_and_seed_intervals():
    assert mcnemar_exact(10, 2) == pytest.approx(0.0385742, rel=1e-5)  # binomial, two-sided
    assert t_quantile(2) == pytest.approx(4.302653, rel=1e-5) and t_quantile(1) == pytest.approx(12.7062, rel=1e-4)
    mean, lo, hi = seed_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and (hi - mean) == pytest.approx(4.302653 * 1 / math.sqrt(3), rel=1e-5)
    # three seeds that agree do not claim more precision than their items give
    mean, lo, hi = seed_interval([1.0, 1.0, 1.0], within_se=[0.5, 0.5, 0.5])
    assert (hi - mean) == pytest.approx(4.302653 * 0.5 / math.sqrt(3), rel=1e-5)
    assert detectable_drop(1000, 0.1) == pytest.approx(100 * 2.801585 * math.sqrt(0.1 / 1000), rel=1e-5)


def _verdict(before: list[int], after: list[int]) -> ret.Verdict:
    items = [SuiteItem(f"k-{i}", "kind", "p", "choice", ("a", "b"), 0) for i in range(len(before))]
    return ret.compare(
        ret.SuiteRun(items, [bool(x) for x in before], ["a"] * len(before)),
        ret.SuiteRun(items, [bool(x) for x in after], ["a"] * len(after)),
    )


def test_the_gate_fails_only_a_drop_beyond_the_threshold_with_confidence():
    before = [1] * 600 + [0] * 400
    big = list(before)
    big[:100] = [0] * 100  # -10 points
    assert ret.gate(_verdict(before, big), None) is None
    reason = ret.gate(_verdict(before, big), 5)
    assert reason.startswith("forgetting gate: general ability fell 10.0 points") and "beyond the 5 allowed" in reason
    assert ret.gate(_verdict(before, big), 10) is None  # -10 is not beyond 10 with confidence
    small = list(before)
    small[:5] = [0] * 5
    assert ret.gate(_verdict(before, small), 0) is None  # -0.5 [CI includes 0]: not a confident drop at all


def test_the_verdict_line_has_the_shape_scripts_parse():
    before = [1] * 600 + [0] * 640
    after = list(before)
    after[:31], after[600:614] = [0] * 31, [1] * 14
    line = ret.verdict_line(_verdict(before, after))
    m = re.fullmatch(
        r"general ability: ([\d.]+) % → ([\d.]+) % \(([+-][\d.]+) \[([+-][\d.]+), ([+-][\d.]+)\] points on "
        r"([\d,]+) items; (\d+) right→wrong, (\d+) wrong→right\)",
        line,
    )
    assert m, line
    assert m.group(1) == "48.4" and m.group(3) == "-1.4" and m.group(6) == "1,240" and m.group(7, 8) == ("31", "14")
    assert float(m.group(4)) < -1.4 < float(m.group(5))


def test_the_taught_format_in_general_replies_is_counted_on_generated_replies_only(tmp_path):
    """A reply that names the right answer and then writes the taught format is right for the verifier; the verdict
    counts it apart (base → model, generated replies only: a choice cannot leak), prints it, and records it. The
    openings come from the eval sets that teach a format, and from a run's own recipe when no set is named."""
    from types import SimpleNamespace

    from psft_lite import api
    from psft_lite.inference.evaluate import EvalItem, taught_openings
    from psft_lite.recipe.schema import recipe_from_dict

    items = [SuiteItem("c", "fact", "p", "choice", ("[[answer: 1]]", "b"), 0)]
    items += [SuiteItem(f"g{i}", "short_answer", "p", "check", check={"type": "names"}) for i in range(4)]
    before = ret.SuiteRun(items, [True] * 5, ["[[answer: 1]]", "Paris.", "Paris.", "Rome.", "Oslo."])
    after = ret.SuiteRun(items, [True] * 5, ["[[answer: 1]]", "Paris.\n[[answer: 13]]", "Paris.", "x [[answer:", "y"])
    v = ret.compare(before, after)
    v.leak = ret.format_leak(before, after, ["[[answer:"])
    assert (v.leak.n, v.leak.before, v.leak.after) == (4, 0, 2)
    assert v.overall.delta == 0  # the accuracy alone sees nothing
    lines = ret.report_lines(v)
    assert lines[1].startswith("taught format in general replies: 0 → 2 of 4 (replies that write '[[answer:'")
    assert v.as_dict()["format_leak"] == {"openings": ["[[answer:"], "n": 4, "before": 0, "after": 2}
    assert ret.format_leak(before, after, []) is None and "format_leak" not in ret.compare(before, after).as_dict()

    taught = EvalItem([], "r", "5", "f.jsonl:1", "format", "[[answer: {answer}]]")
    plain = EvalItem([], "r", "5", "g.jsonl:1")
    assert taught_openings({"a": [plain, taught], "b": [taught]}) == ["[[answer:"]
    assert taught_openings({"a": [plain]}) == []
    (tmp_path / "test.jsonl").write_text(
        json.dumps({"prompt": "2+3?", "completion": "5\n<<5>>", "match": "format", "format": "<<{answer}>>"}) + "\n"
    )
    recipe = recipe_from_dict(
        {
            "model": {"name": "m"},
            "data": {"train": str(tmp_path / "test.jsonl")},
            "eval": {"sets": {"t": str(tmp_path / "test.jsonl")}},
        }
    )
    assert api._taught(SimpleNamespace(recipe=recipe), {}) == ["<<"]
    (tmp_path / "test.jsonl").unlink()  # a run whose eval files are gone states no format
    assert api._taught(SimpleNamespace(recipe=recipe), {}) == []


def _tiny_run(tmp_path, tiny_model_dir, capsys):
    from conftest import make_recipe, run_cli

    recipe = make_recipe(tmp_path, tiny_model_dir)
    code, _, err = run_cli(capsys, "train", str(recipe))
    assert code == 0, err
    return tmp_path / "run"


def test_eval_retention_on_a_run_and_on_a_plain_model_and_the_gate_exit_code(
    tmp_path, tiny_model_dir, capsys, monkeypatch
):
    """`eval RUN --retention` compares the run with its base item by item and writes every item; a plain model is
    compared with itself (exactly 0); the base's results are cached (a second verdict scores only the run); a
    confident drop beyond --max-forgetting exits 3 with a one-line reason, after the outputs are written."""
    from conftest import run_cli

    monkeypatch.setenv("PSFT_LITE_HOME", str(tmp_path / "home"))
    small = ret.load_suite()[::25]
    monkeypatch.setattr(
        ret, "load_suite", lambda path=None, kinds=(): [x for x in small if not kinds or x.kind in kinds]
    )
    run = _tiny_run(tmp_path, tiny_model_dir, capsys)
    code, out, err = run_cli(capsys, "eval", str(run), "--retention", "--per-kind", "--out", str(tmp_path / "ev"))
    assert code == 0, err
    assert f"points on {len(small)} items;" in out and "KL to the base:" in out
    assert sum(line.startswith("  ") for line in out.splitlines()) == len({it.kind for it in small})  # --per-kind
    rows = [json.loads(x) for x in (tmp_path / "ev" / "retention-items.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [it.id for it in small]
    cached = list((tmp_path / "home" / "retention").glob("suite-*.json"))
    assert len(cached) == 1

    calls = []
    real = ret.run_suite
    monkeypatch.setattr(ret, "run_suite", lambda *a, **k: calls.append(1) or real(*a, **k))
    code, out2, err = run_cli(capsys, "eval", str(run), "--retention")
    assert code == 0 and calls == [1]  # the base came from the cache: only the run was scored
    assert out2.splitlines()[0] == out.splitlines()[0]  # the same verdict

    code, out3, err = run_cli(capsys, "eval", str(run), "--retention", "--retention-kinds", "fact,opposite")
    assert code == 0, err
    chosen = [x for x in small if x.kind in ("fact", "opposite")]
    assert 0 < len(chosen) < len(small) and f"points on {len(chosen)} items;" in out3

    code, out, err = run_cli(capsys, "eval", str(tiny_model_dir), "--retention")
    assert code == 0, err
    assert re.search(r"\(\+0\.0 \[\+0\.0, \+0\.0\] points on \d+ items; 0 right→wrong, 0 wrong→right\)", out), out

    def forgot(*a, **k):  # a verdict with a confident 10-point drop, through the real command and exit path
        return _verdict([1] * 600 + [0] * 400, [0] * 100 + [1] * 500 + [0] * 400)

    monkeypatch.setattr(ret, "evaluate_retention", forgot)
    code, out, err = run_cli(capsys, "eval", str(run), "--retention", "--max-forgetting", "2")
    assert code == 3, (code, err)
    assert "forgetting gate: general ability fell 10.0 points" in err and "general ability: 60.0 % → 50.0 %" in out
    code, _, err = run_cli(capsys, "eval", str(run), "--max-forgetting", "2")
    assert code == 2 and "go with --retention" in err


def test_the_retention_page_is_what_its_committed_records_generate():
    """docs/retention.md's tables (calibration, teeth checks, power) regenerate from docs/retention/teeth/ exactly,
    and the three checks show what they were built to show."""
    from psft_lite.study.blocks import splice
    from psft_lite.study.retention_docs import blocks, read

    from conftest import ROOT

    page = (ROOT / "docs" / "retention.md").read_text()
    regenerated = page
    for name, block in blocks(ROOT / "docs" / "retention" / "teeth").items():
        regenerated = splice(regenerated, block + "\n", name)
    assert regenerated == page, "run make retention-docs"
    teeth = read(ROOT / "docs" / "retention" / "teeth")
    assert teeth["damaged"]["overall"]["high"] < -10  # a large drop, far from 0
    assert teeth["gentle"]["overall"]["low"] <= 0 <= teeth["gentle"]["overall"]["high"]
    assert teeth["base"]["overall"]["delta"] == teeth["base"]["overall"]["low"] == 0
