"""`psft-lite eval`: math-answer accuracy (GSM8K `#### N`, `\\boxed{}`), generation entropy and reference NLL.

Per data set: greedy pass@1 (or avg@k with sampling), the mean token entropy of the generations (the model's own
distribution at each generated token), and the mean NLL of the reference responses under the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from psft_lite.core.errors import RecipeError
from psft_lite.core.files import atomic_write_text
from psft_lite.data import load_conversations
from psft_lite.data.tokenize import Example, encode_all
from psft_lite.inference.generate import Loaded, generate
from psft_lite.model import scoring
from psft_lite.model.logprobs import kl_to_reference, target_logprobs
from psft_lite.model.scoring import score_examples
from psft_lite.recipe.schema import RowFormat, Source

# ---------------------------------------------------------------------------------------------------------------------
# Answer extraction

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (balanced braces), or None."""
    i = text.rfind("\\boxed")
    if i < 0:
        return None
    j = text.find("{", i)
    if j < 0:
        return None
    depth = 0
    for k in range(j, len(text)):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            depth -= 1
            if depth == 0:
                return text[j + 1 : k]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a solution: after the last `####`, else the last \\boxed{}, else the last number."""
    if text is None:
        return None
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        m = _NUMBER.search(tail.replace("$", ""))
        if m:
            return normalize(m.group(0))
        return normalize(tail.splitlines()[0]) if tail else None
    boxed = _boxed(text)
    if boxed is not None:
        inner = boxed.replace("\\!", "").replace("\\,", "").replace("{,}", ",").replace("$", "")
        inner = re.sub(r"\\(?:d|t)?frac\{([^{}]+)\}\{([^{}]+)\}", r"\1/\2", inner)
        inner = re.sub(r"\\text\{[^{}]*\}", "", inner)
        return normalize(inner)
    nums = _NUMBER.findall(text.replace("$", ""))
    return normalize(nums[-1]) if nums else None


def normalize(ans: str) -> str:
    """Canonical form: numbers without commas, units or trailing zeros ('1,000.50 dollars' → '1000.5')."""
    s = ans.strip().rstrip(".").strip()
    m = _NUMBER.search(s)
    if m and re.fullmatch(r"[\s$€£]*" + re.escape(m.group(0)) + r"\s*(?:%|[A-Za-z][A-Za-z .]*)?", s):
        num = m.group(0).replace(",", "")
        try:
            value = Fraction(num)
        except (ValueError, ZeroDivisionError):
            return num
        if value.denominator == 1:
            return str(value.numerator)
        as_float = float(value)
        return f"{as_float:.6g}" if "/" not in num else f"{value.numerator}/{value.denominator}"
    return re.sub(r"\s+", " ", s).lower()


def answers_match(pred: str | None, gold: str | None) -> bool:
    if pred is None or gold is None:
        return False
    if pred == gold:
        return True
    try:
        return math.isclose(float(Fraction(pred)), float(Fraction(gold)), rel_tol=1e-6, abs_tol=1e-9)
    except (ValueError, ZeroDivisionError):
        return False


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class EvalItem:
    prompt: list[dict[str, str]]  # the conversation up to the final assistant turn
    reference: str  # the reference response
    gold: str | None
    where: str
    # "answer": compare extracted final answers; "contains": any of gold's |-alternatives appears; "format": the
    # answer written exactly as `pattern` says (e.g. "[[answer: {answer}]]"): a taught output format
    match: str = "answer"
    pattern: str | None = None
    base_correct: bool | None = None  # a retention row: whether the base model's own answer was right (None: unknown)

    def correct(self, generation: str) -> tuple[str | None, bool]:
        """(extracted answer, correct?) for one generation."""
        if self.match == "format":
            want = (self.pattern or "{answer}").replace("{answer}", self.gold or "")
            return (want if want in generation else extract_answer(generation)), want in generation
        if self.match == "contains":
            alts = [a.strip() for a in (self.gold or "").split("|") if a.strip()]
            hit = next((a for a in alts if re.search(r"(?<!\w)" + re.escape(a) + r"(?!\w)", generation, re.I)), None)
            return hit, hit is not None
        ans = extract_answer(generation)
        return ans, answers_match(ans, self.gold)

    @property
    def opening(self) -> str:
        """What a taught format writes before the answer (`[[answer: ` for `[[answer: {answer}]]`); "" for others."""
        return format_opening(self.pattern) if self.match == "format" else ""

    def format_scores(self, generation: str) -> tuple[bool, bool]:
        """For a taught-format item: (the format's opening was written, the final answer is right in any format) —
        so "learned the format" and "solved the problem" are told apart."""
        return bool(self.opening) and self.opening in generation, answers_match(extract_answer(generation), self.gold)


def format_opening(pattern: str | None) -> str:
    """The part of a taught answer format before `{answer}`: what shows the format was written."""
    return (pattern or "{answer}").split("{answer}")[0]


def taught_openings(sets: dict[str, list[EvalItem]]) -> list[str]:
    """The taught formats' openings across eval sets (their items matched in a format), each once: what a fine-tune
    taught that should not turn up in replies to general prompts."""
    return list(dict.fromkeys(it.opening.strip() for items in sets.values() for it in items if it.opening.strip()))


def eval_items(
    source: Source, data: RowFormat, limit: int | None = None, base_dir: Path | None = None
) -> list[EvalItem]:
    """Problems with gold answers: from an `answer` column when present, else extracted from the reference."""
    items = []
    for msgs, row in load_conversations(source, data, limit=limit, base_dir=base_dir):
        *prompt, last = msgs
        match = row.data.get("match") if row.data.get("match") in ("contains", "format") else "answer"
        gold = gold_answer(row.data, last["content"], match)
        base = row.data.get("base_correct")
        items.append(
            EvalItem(
                prompt,
                last["content"],
                gold,
                row.where,
                match,
                row.data.get("format"),
                base if isinstance(base, bool) else None,
            )
        )
    return items


def gold_answer(data: dict[str, Any], reference: str, match: str = "answer") -> str | None:
    """The gold answer of a row: its `answer` column when it has one (a bare answer, or a GSM8K-style solution),
    else the final answer of the reference response."""
    gold = data.get("answer") if isinstance(data.get("answer"), (str, int, float)) else None
    if match == "contains":
        return str(gold if gold is not None else reference)
    if gold is not None:
        return extract_answer(str(gold)) if "####" in str(gold) else normalize(str(gold))
    return extract_answer(reference)


def mean_nll(loaded: Loaded, examples: list[Example], batch_size: int = 8) -> float:
    """Mean NLL per trained token (end-of-turn included) of tokenized examples under the model."""
    total, count = 0.0, 0
    for b, logp, _ in score_examples(
        loaded.model, examples, loaded.tokenizer.pad_token_id, loaded.device, loaded.dtype, batch_size
    ):
        total += float(-(logp * b.target_mask).sum())
        count += b.n_trained
    return total / max(count, 1)


def reference_examples(tokenizer: Any, items: list[EvalItem], max_length: int) -> list[Example]:
    """Each problem with its reference response as the trained turn: what teacher-forced scores are computed on."""
    convs = [(it.prompt + [{"role": "assistant", "content": it.reference}], it.where) for it in items]
    return encode_all(tokenizer, convs, max_length, "truncate")[0]


def reference_nll(loaded: Loaded, items: list[EvalItem], max_length: int = 2048) -> float:
    """Mean NLL per token of the reference responses under the model."""
    return mean_nll(loaded, reference_examples(loaded.tokenizer, items, max_length))


def evaluate_set(
    loaded: Loaded,
    items: list[EvalItem],
    samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 512,
    batch_size: int = 16,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    nll: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary, predictions) for one data set. With samples k > 1, accuracy is avg@k."""
    preds: list[dict[str, Any]] = []
    correct = 0.0
    entropies: list[float] = []
    formats: list[tuple[bool, bool]] = []
    for k in range(samples):
        gens = generate(
            loaded,
            [it.prompt for it in items],
            max_new_tokens,
            temperature,
            top_p,
            batch_size,
            seed=seed + 1000 * k,
            progress=progress,
        )
        for it, g in zip(items, gens):
            ans, ok = it.correct(g.text)
            correct += ok
            entropies.append(g.mean_entropy)
            if it.match == "format":
                formats.append(it.format_scores(g.text))
            preds.append(
                {
                    "where": it.where,
                    "sample": k,
                    "prompt": it.prompt[-1]["content"],
                    "generation": g.text,
                    "extracted": ans,
                    "gold": it.gold,
                    "correct": ok,
                    "finished": g.finished,
                    "tokens": g.n_tokens,
                    "mean_entropy": g.mean_entropy,
                }
            )
            if it.match == "format":
                preds[-1]["format_used"], preds[-1]["answer_right"] = formats[-1]
    n = len(items)
    summary = {
        "n": n,
        "samples": samples,
        "accuracy": correct / (n * samples) if n else 0.0,
        "mean_entropy": sum(entropies) / len(entropies) if entropies else 0.0,
        "finished": sum(p["finished"] for p in preds) / len(preds) if preds else 0.0,
    }
    if formats:  # a taught-format set: how often the format was used, and accuracy whatever the format
        summary["format_rate"] = sum(f for f, _ in formats) / len(formats)
        summary["answer_accuracy"] = sum(a for _, a in formats) / len(formats)
    if nll:
        summary["mean_nll"] = reference_nll(loaded, items)
    return summary, preds


def kl_to_base(loaded: Loaded, items: list[EvalItem], max_length: int = 512) -> float:
    """Mean over reference tokens of KL(p_base ‖ p_model), teacher-forced on the items' reference answers (0 for a
    model without an adapter: it is the base)."""
    rows = kl_rows(loaded, items, max_length)
    return sum(s for s, _ in rows) / max(sum(n for _, n in rows), 1)


def kl_rows(loaded: Loaded, items: list[EvalItem], max_length: int = 512) -> list[tuple[float, int]]:
    """Per item, (sum of KL(p_base ‖ p_model) over its reference tokens, number of tokens): what a bootstrap over
    prompts resamples. All zeros for a model without an adapter (it is the base)."""
    examples = reference_examples(loaded.tokenizer, items, max_length)
    counts = [int(ex.mask[1:].sum()) for ex in examples]
    if not loaded.has_adapter:
        return [(0.0, n) for n in counts]
    kl_sums, _ = _retention_pass(loaded, examples, None)
    return list(zip(kl_sums, counts))


def evaluate_sets(
    loaded: Loaded,
    sets: dict[str, list[EvalItem]],
    *,
    samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 512,
    batch_size: int = 16,
    nll: bool | tuple[str, ...] = True,
    kl_sets: tuple[str, ...] = (),
    console: Console | None = None,
    base_cache: dict | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """The one way psft-lite evaluates a model on named sets (`psft-lite eval`, `study`, the in-training eval):
    per set, (summary, predictions); sets named in `kl_sets` also get `kl_to_base`. `nll`: every set's reference NLL
    (True), none (False), or only the named sets' — it is a teacher-forced pass over every reference answer, a quarter
    of a set's time, so a caller that reads it on one set names that one. With a console, a progress bar over every
    generation. `base_cache`: see `retention_scores`."""
    summaries: dict[str, dict[str, Any]] = {}
    predictions: dict[str, list[dict[str, Any]]] = {}
    to_generate = {name: items for name, items in sets.items() if not is_retention_set(items)}
    with progress_bar(console, sum(len(v) for v in to_generate.values()) * samples) as advance:
        for name, items in sets.items():
            if is_retention_set(items):  # the base's own answers: scored teacher-forced, nothing generated
                summaries[name], predictions[name] = retention_scores(loaded, items, base_cache), []
                continue
            advance(0, name)
            summaries[name], predictions[name] = evaluate_set(
                loaded,
                items,
                samples,
                temperature,
                top_p,
                max_new_tokens,
                batch_size,
                progress=advance,
                nll=nll if isinstance(nll, bool) else name in nll,
            )
            if name in kl_sets:
                summaries[name]["kl_to_base"] = kl_to_base(loaded, items)
    return summaries, predictions


def is_retention_set(items: list[EvalItem]) -> bool:
    """A set of the base model's own answers to general prompts (data/retention/base.jsonl, marked by its
    `base_correct` column): what a fine-tune's NLL and KL to the base are measured on (teacher-forced)."""
    return bool(items) and any(it.base_correct is not None for it in items)


def retention_scores(loaded: Loaded, items: list[EvalItem], base_cache: dict | None = None) -> dict[str, Any]:
    """How far the model is from the base on the base's own answers to general prompts: mean NLL of those answers
    and KL(base ‖ model) per token, over every row.

    One forward with the adapter gives both. The adapter-off forward depends only on the base and the items, so a
    caller that scores many adapters of one base (a study) passes the same `base_cache` dict and pays for it once."""
    examples = reference_examples(loaded.tokenizer, items, 512)
    counts = [int(ex.mask[1:].sum()) for ex in examples]
    kl_sums, nll_sums = _retention_pass(loaded, examples, base_cache)
    tokens = max(sum(counts), 1)
    return {
        "mean_nll": sum(nll_sums) / tokens,
        "kl_to_base": sum(kl_sums) / tokens,
        "kl_rows": [[round(s, 6), n] for s, n in zip(kl_sums, counts)],
        "rows": len(items),
    }


@torch.no_grad()
def _retention_pass(loaded: Loaded, examples: list[Example], base_cache: dict | None) -> tuple[list, list]:
    """Per example, (sum of KL(p_base ‖ p_model), sum of −log p_model) over its trained tokens."""
    head = scoring.lm_head(loaded.model)
    args = (head.bias, 1024, head.softcap, head.scale)
    cache = base_cache if base_cache is not None else {}
    kl_sums: list[float] = []
    nll_sums: list[float] = []
    for i, b in enumerate(scoring.example_batches(examples, loaded.tokenizer.pad_token_id, loaded.device)):
        mask = b.target_mask[:, 1:]
        with scoring.autocast(loaded.device, loaded.dtype):
            hidden = scoring.causal_lm(loaded.model).get_decoder()(**b.model_inputs(), use_cache=False)
            hidden = hidden.last_hidden_state[:, :-1]
            base = _base_hidden(loaded, b, hidden[mask], cache, i)
        logp, _ = target_logprobs(hidden, head.weight, b.input_ids[:, 1:], mask, *args)
        nll_sums += [-float(v) for v in logp.double().sum(1)]
        if not loaded.has_adapter:
            kl_sums += [0.0] * mask.shape[0]
            continue
        kl = kl_to_reference(base, hidden[mask], head.weight, *args).double()
        kl_sums += [float(part.sum()) for part in kl.split(mask.sum(1).tolist())]
    return kl_sums, nll_sums


def _base_hidden(loaded: Loaded, b: Any, hidden: torch.Tensor, cache: dict, i: int) -> torch.Tensor:
    """The adapter-off hidden states at a batch's trained positions: from `cache` (keyed by the batch's tokens), else
    one forward with the adapter disabled (or `hidden` itself for a model without an adapter)."""
    key = (i, hashlib.sha1(b.input_ids.cpu().numpy().tobytes() + b.target_mask.cpu().numpy().tobytes()).hexdigest())
    if key not in cache:
        if loaded.has_adapter:
            cache[key] = scoring.base_reference(loaded.model, b).hidden
        else:
            cache[key] = hidden
    return cache[key]


@contextlib.contextmanager
def progress_bar(console: Console | None, total: int, label: str = "eval") -> Iterator[Callable[..., None]]:
    """A transient rich bar on `console` (nothing without one); yields advance(n, description=None)."""
    if console is None:
        yield lambda n, description=None: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(f"[bold]{label}[/bold] {{task.description}}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("", total=total)

        def advance(n: int, description: str | None = None) -> None:
            if description is not None:
                bar.update(task, description=description)
            bar.advance(task, n)

        yield advance


def recipe_sets(recipe: Any) -> dict[str, tuple[Source, RowFormat]]:
    """How a run's eval sets are read: `data.eval` in the training data's format (it is held-out training data),
    each of `eval.sets` in its own format, detected per file (an eval set is not the user's training data: the
    quickstart's arithmetic problems stay prompt/completion when the training data is ShareGPT)."""
    d = recipe.data
    own = RowFormat(max_length=d.max_length, system_prompt=d.system_prompt, truncation="truncate")
    if recipe.eval.sets:
        return {name: (src, own) for name, src in recipe.eval.sets.items()}
    return {"eval": (d.eval, d)} if d.eval is not None else {}


def recipe_eval_items(recipe: Any, limit: int | None = None) -> dict[str, list[EvalItem]]:
    """Every eval set of a recipe, read and checked (a bad file is a DataError naming it, before any model loads)."""
    base_dir = recipe.path.parent if recipe.path else None
    return {
        name: eval_items(src, rows, limit=limit, base_dir=base_dir) for name, (src, rows) in recipe_sets(recipe).items()
    }


def named_sets(
    loaded: Loaded, data: list[str] | None, data_config: str | None, split: str, limit: int | None
) -> dict[str, list[EvalItem]]:
    """What `psft-lite eval` scores: each `--data [NAME=]FILE`, else the run's `eval.sets` (or `data.eval`)."""
    recipe = loaded.recipe
    if data:
        rows = RowFormat(max_length=recipe.data.max_length if recipe else 4096)
        named = {}
        for item in data:
            name, _, path = item.rpartition("=") if "=" in item else (Path(item).stem, "", item)
            named[name] = (Source(path=path, config=data_config, split=split), rows)
    elif recipe is not None and recipe_sets(recipe):
        return recipe_eval_items(recipe, limit)
    else:
        raise RecipeError(
            "no data to evaluate: pass --data FILE (or NAME=FILE), or a run whose recipe has data.eval or eval.sets."
        )
    return {name: eval_items(src, rows, limit=limit) for name, (src, rows) in named.items()}


def summary_lines(summaries: dict[str, dict[str, Any]], samples: int) -> list[str]:
    """One line per set, as `psft-lite eval` prints them (a retention set: the base's right answers kept, and the
    NLL of and KL to the base's own answers)."""
    metric = "pass@1" if samples == 1 else f"avg@{samples}"
    lines = []
    for name, sm in summaries.items():
        if "kl_rows" in sm:
            lines.append(
                f"{name:>12}  on the base's own answers to {sm['rows']} prompts: NLL {sm['mean_nll']:.3f}, KL to the "
                f"base {sm['kl_to_base']:.3f} nats/token"
            )
        else:
            lines.append(
                f"{name:>12}  n={sm['n']:<5} {metric} {sm['accuracy']:.1%}   entropy {sm['mean_entropy']:.3f}   "
                f"reference NLL {sm['mean_nll']:.3f}   finished {sm['finished']:.0%}"
                + (
                    f"   format used {sm['format_rate']:.0%}, right answer in any format {sm['answer_accuracy']:.1%}"
                    if "format_rate" in sm
                    else ""
                )
            )
    return lines


def write_outputs(
    out: Path, summaries: dict[str, dict[str, Any]], predictions: dict[str, list[dict[str, Any]]]
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "summary.json", json.dumps(summaries, indent=2) + "\n")
    rows = [json.dumps({"set": name, **p}) + "\n" for name, preds in predictions.items() for p in preds]
    atomic_write_text(out / "predictions.jsonl", "".join(rows))
