"""Behavioural retention: what a model can still do, on the shipped general-ability suite (psft_lite/data/suite.py),
compared item by item with its base model — the verdict `psft-lite eval MODEL --retention` and `[eval] final` print.

Scoring (per item, 0/1):
- `choice` items: every option is scored as the whole assistant reply (its tokens and the end-of-turn token) by
  log-likelihood, and the item is right when the right option scores highest. All options of an item share one
  forward: the prompt is written once and each option attends to the prompt and to itself only (a 4-D attention mask,
  position ids restarting after the prompt), and many items share a row behind the common chat prefix (the system
  prompt) — the same numbers as one forward per option, for about a fifth of the tokens.
- `check` items: a greedy reply checked by a strict verifier (VERIFIERS).

A run is compared with its base (the adapter disabled) on the same items: the change in accuracy with a paired
bootstrap interval, right→wrong and wrong→right counts (psft_lite.core.stats). The base's item results depend only on
the base and the suite, so they are cached under $PSFT_LITE_HOME/retention/ and computed once per base model.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from psft_lite.core.errors import DataError, RecipeError
from psft_lite.core.files import atomic_write_text
from psft_lite.core.stats import Change, paired_change

SUITE_FILE = Path(__file__).resolve().parent.parent / "data" / "retention" / "suite.jsonl"
#: new tokens for a checked reply, per kind: a short answer ("The capital of Japan is Tokyo.") fits in 24, a list of
#: four items or a repeated sentence in 40; a longer budget changed one verdict of 220 on the base and cost 20 % more
CHECK_TOKENS = {"short_answer": 24, "instruction": 40}


@dataclass(frozen=True)
class SuiteItem:
    id: str
    kind: str
    prompt: str
    score: str  # "choice" | "check"
    choices: tuple[str, ...] = ()
    answer: int | None = None  # index of the right choice
    check: dict[str, Any] = field(default_factory=dict)  # a verifier and its parameters

    @property
    def chance(self) -> float:
        return 1 / len(self.choices) if self.score == "choice" else 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Verifiers: reply text → right?

_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*")
_NUM = re.compile(r"-?\d+(?:\.\d+)?")


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().strip("\"'").strip()).rstrip(".").strip().lower()


def _mentions(text: str, phrase: str) -> bool:
    return re.search(r"(?<![A-Za-z])" + re.escape(phrase.lower()) + r"(?![A-Za-z])", text.lower()) is not None


def first_sentence(reply: str) -> str:
    """The reply up to its first line break or sentence end: where a short answer is given ("The capital of Japan is
    Tokyo."); what follows is commentary, checked by nothing."""
    text = reply.strip()
    m = re.search(r"\n|[.!?](?=\s|$)", text)
    return text[: m.start() + 1] if m else text


def names(reply: str, item: SuiteItem) -> bool:
    """The first sentence names the answer and no other candidate of the item's closed set (candidates that are part
    of the question itself, like the word whose opposite is asked, do not count): "Paris or Rome" is not Paris."""
    answer, said = item.check["answer"], first_sentence(reply)
    in_prompt = {c for c in item.check["candidates"] if _mentions(item.prompt, c)}
    others = [c for c in item.check["candidates"] if c != answer and c not in in_prompt]
    return _mentions(said, answer) and not any(_mentions(said, c) for c in others)


def number(reply: str, item: SuiteItem) -> bool:
    """The last number of the first sentence equals the answer ("4 + 2 = 6." is 6; "365 * 12 = 312 months" is 312,
    not 12; a first sentence that only announces the working has no answer)."""
    found = _NUM.findall(first_sentence(reply).replace(",", ""))
    return bool(found) and float(found[-1]) == float(item.check["answer"])


def exact(reply: str, item: SuiteItem) -> bool:
    """The whole reply equals the answer, ignoring case, surrounding quotes, spaces and a final full stop."""
    return _norm(reply) == _norm(item.check["answer"])


def lines(reply: str, item: SuiteItem) -> bool:
    """Exactly n non-empty lines, each a short list entry (at most five words, bullets and numbers allowed)."""
    rows = [x.strip() for x in reply.strip().splitlines() if x.strip()]
    return len(rows) == item.check["n"] and all(len(_WORD.findall(x)) in range(1, 6) for x in rows)


def no_commas(reply: str, item: SuiteItem) -> bool:
    """No comma anywhere, and at least `min_words` words."""
    return "," not in reply and len(_WORD.findall(reply)) >= item.check["min_words"]


VERIFIERS: dict[str, Callable[[str, SuiteItem], bool]] = {
    "names": names,
    "number": number,
    "exact": exact,
    "lines": lines,
    "no_commas": no_commas,
}
_CHECK_KEYS = {
    "names": {"answer", "candidates"},
    "number": {"answer"},
    "exact": {"answer"},
    "lines": {"n"},
    "no_commas": {"min_words"},
}


# ---------------------------------------------------------------------------------------------------------------------
# The suite file


def load_suite(path: Path = SUITE_FILE, kinds: Sequence[str] = ()) -> list[SuiteItem]:
    """Every item of a suite file, checked: one right answer per item (a valid index into distinct choices, or a
    known verifier with its parameters), unique ids. Bad rows are `DataError`s naming the file and line. With `kinds`
    (`eval.retention_kinds`), only the items of those kinds; a kind the suite does not have is a `RecipeError`."""
    if not Path(path).is_file():
        raise DataError(f"{path}: retention suite not found.")
    items, ids = [], set()
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg}).") from None
        item = _item(row, where)
        if item.id in ids:
            raise DataError(f"{where}: id {item.id!r} appears twice; every item needs its own id.")
        ids.add(item.id)
        items.append(item)
    if not items:
        raise DataError(f"{path}: the retention suite has no items.")
    if kinds:
        known = sorted({it.kind for it in items})
        unknown = [k for k in kinds if k not in known]
        if unknown:
            raise RecipeError(
                f"eval.retention_kinds (eval --retention-kinds): {unknown[0]!r} is not a kind of the retention suite "
                f"({path}); its kinds are {', '.join(known)}. Name some of them, or leave it out to score every item."
            )
        items = [it for it in items if it.kind in kinds]
    return items


def _item(row: Any, where: str) -> SuiteItem:
    if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("id", "kind", "prompt", "score")):
        raise DataError(f"{where}: a suite item needs string fields id, kind, prompt and score.")
    if row["score"] == "choice":
        choices, answer = row.get("choices"), row.get("answer")
        ok = isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)
        if not ok or len(set(choices)) != len(choices):
            raise DataError(f"{where}: a choice item needs at least two distinct, non-empty choices.")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise DataError(f"{where}: answer must be the index of the right choice (0 to {len(choices) - 1}).")
        return SuiteItem(row["id"], row["kind"], row["prompt"], "choice", tuple(choices), answer)
    if row["score"] == "check":
        check = row.get("check")
        kind = check.get("type") if isinstance(check, dict) else None
        if kind not in VERIFIERS:
            raise DataError(f"{where}: check.type must be one of {', '.join(VERIFIERS)}.")
        missing = _CHECK_KEYS[kind] - set(check)
        if missing:
            raise DataError(f"{where}: a {kind!r} check needs {', '.join(sorted(missing))}.")
        if kind == "names" and check["answer"] not in check["candidates"]:
            raise DataError(f"{where}: the answer must be one of the candidates.")
        return SuiteItem(row["id"], row["kind"], row["prompt"], "check", check=dict(check))
    raise DataError(f"{where}: score must be 'choice' or 'check', not {row['score']!r}.")


#: bumped whenever scoring changes (a verifier, a token budget, how options are scored): cached results go stale
SCORING_VERSION = 1


def suite_digest(items: list[SuiteItem]) -> str:
    """A short hash of the items and the scoring version: cached base results belong to one version of both."""
    text = json.dumps(
        [SCORING_VERSION, CHECK_TOKENS, [[i.id, i.prompt, list(i.choices), i.answer, i.check] for i in items]],
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------------------------
# Multiple choice by log-likelihood, one forward per row of packed items


@dataclass
class _Tree:
    """One item as token blocks: the prompt after the shared prefix, then each option (reply + end-of-turn)."""

    index: int
    question: list[int]
    options: list[list[int]]

    def __len__(self) -> int:
        return len(self.question) + sum(len(o) for o in self.options)


def _trees(tokenizer: Any, items: list[SuiteItem]) -> tuple[list[int], list[_Tree]]:
    """(shared prefix, per item its blocks). Tokens come from the training tokenizer's own encoding of each reply as
    the assistant turn (psft_lite.data.tokenize), so an option is scored exactly as it would be trained."""
    from psft_lite.data.tokenize import encode, special_token_ids

    special = special_token_ids(tokenizer)
    raw = []
    for i, item in enumerate(items):
        prompt: list[int] | None = None
        options = []
        for option in item.choices:
            msgs = [{"role": "user", "content": item.prompt}, {"role": "assistant", "content": option}]
            ids, mask, _ = encode(tokenizer, msgs, item.id, special)
            first, last = int(mask.argmax()), len(mask) - int(mask[::-1].argmax())
            if prompt is None:
                prompt = ids[:first].tolist()
            elif ids[:first].tolist() != prompt:
                raise DataError(f"{item.id}: the chat template renders the prompt differently for different replies.")
            options.append(ids[first:last].tolist())
        raw.append((i, prompt or [], options))
    shared = raw[0][1]
    for _, prompt, _ in raw[1:]:
        k = 0
        while k < min(len(shared), len(prompt)) and shared[k] == prompt[k]:
            k += 1
        shared = shared[:k]
    shared = shared[: min(len(p) for _, p, _ in raw) - 1]  # every item keeps at least one token of its own
    return shared, [_Tree(i, p[len(shared) :], o) for i, p, o in raw]


def _rows(trees: list[_Tree], room: int) -> list[list[_Tree]]:
    rows: list[list[_Tree]] = [[]]
    used = 0
    for t in trees:
        if rows[-1] and used + len(t) > room:
            rows.append([])
            used = 0
        rows[-1].append(t)
        used += len(t)
    return rows


@dataclass
class _Row:
    """One packed row: tokens, their position ids, the attention mask between them, and the scored tokens as
    (item, option, position of the hidden state that predicts it, the token)."""

    ids: list[int]
    pos: list[int]
    allowed: torch.Tensor  # bool [n, n]: query i may attend to key j
    targets: list[tuple[int, int, int, int]]


def _layout(prefix: list[int], trees: list[_Tree]) -> _Row:
    """Blocks form a tree: the shared prefix; below it each item's question; below that each option. A token attends
    to earlier tokens of its own block and to its ancestors' blocks; position ids continue along the tree path."""
    ids, pos, block = list(prefix), list(range(len(prefix))), [0] * len(prefix)
    parent = [-1]  # block → its parent block
    targets: list[tuple[int, int, int, int]] = []
    for t in trees:
        q = len(parent)
        parent.append(0)
        ids += t.question
        pos += range(len(prefix), len(prefix) + len(t.question))
        block += [q] * len(t.question)
        last_question = len(ids) - 1
        for k, option in enumerate(t.options):
            b = len(parent)
            parent.append(q)
            for j, tok in enumerate(option):
                targets.append((t.index, k, last_question if j == 0 else len(ids) - 1, tok))
                ids.append(tok)
                pos.append(len(prefix) + len(t.question) + j)
                block.append(b)
    ancestor = torch.zeros(len(parent), len(parent), dtype=torch.bool)  # [b, a]: a is b or an ancestor of b
    for b in range(len(parent)):
        a = b
        while a != -1:
            ancestor[b, a] = True
            a = parent[a]
    blocks = torch.tensor(block)
    causal = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
    return _Row(ids, pos, ancestor[blocks][:, blocks] & causal, targets)


@torch.no_grad()
def score_choices(
    loaded: Any,
    items: list[SuiteItem],
    room: int = 768,
    rows_per_batch: int = 4,
    progress: Callable[[int], None] | None = None,
) -> list[list[float]]:
    """Per item, the log-likelihood of each option as the whole reply (sum over its tokens and the end-of-turn)."""
    from psft_lite.model import scoring
    from psft_lite.model.logprobs import target_logprobs

    if not items:
        return []
    prefix, trees = _trees(loaded.tokenizer, items)
    scores = [[0.0] * len(it.choices) for it in items]
    head = scoring.lm_head(loaded.model)
    decoder = scoring.causal_lm(loaded.model).get_decoder()
    eager = getattr(scoring.causal_lm(loaded.model).config, "_attn_implementation", "sdpa") == "eager"
    rows = _rows(trees, room - len(prefix))
    for start in range(0, len(rows), rows_per_batch):
        laid = [_layout(prefix, row) for row in rows[start : start + rows_per_batch]]
        length = max(len(row.ids) for row in laid)
        ids = torch.full((len(laid), length), loaded.tokenizer.pad_token_id or 0, dtype=torch.long)
        pos = torch.zeros((len(laid), length), dtype=torch.long)
        mask = torch.eye(length, dtype=torch.bool).repeat(len(laid), 1, 1, 1)  # padding attends to itself only
        for r, row in enumerate(laid):
            n = len(row.ids)
            ids[r, :n], pos[r, :n], mask[r, 0, :n, :n] = torch.tensor(row.ids), torch.tensor(row.pos), row.allowed
        ids, pos, mask = ids.to(loaded.device), pos.to(loaded.device), mask.to(loaded.device)
        if eager:  # eager attention adds the mask to the scores
            mask = torch.zeros(mask.shape, dtype=loaded.dtype, device=loaded.device).masked_fill(
                ~mask, torch.finfo(loaded.dtype).min
            )
        with scoring.autocast(loaded.device, loaded.dtype):
            hidden = decoder(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False).last_hidden_state
        at = [(r, p) for r, row in enumerate(laid) for _, _, p, _ in row.targets]
        h = hidden[torch.tensor([r for r, _ in at]), torch.tensor([p for _, p in at])][None]
        tokens = torch.tensor([tok for row in laid for *_, tok in row.targets], device=hidden.device)[None]
        logp, _ = target_logprobs(
            h, head.weight, tokens, torch.ones_like(tokens, dtype=torch.bool), head.bias, 1024, head.softcap, head.scale
        )
        owners = [(i, k) for row in laid for i, k, _, _ in row.targets]
        for (i, k), v in zip(owners, logp[0].tolist()):
            scores[i][k] += v
        if progress:
            progress(sum(len(row) for row in rows[start : start + rows_per_batch]))
    return scores


# ---------------------------------------------------------------------------------------------------------------------
# Checked items: a greedy reply each


def score_checks(
    loaded: Any, items: list[SuiteItem], batch_size: int = 64, progress: Callable[[int], None] | None = None
) -> list[tuple[bool, str]]:
    """(right, reply) per item: greedy, at most CHECK_TOKENS[kind] new tokens (40 for other kinds), the reply checked
    by its verifier as it stands."""
    from psft_lite.inference.generate import generate

    out: dict[str, tuple[bool, str]] = {}
    for budget in sorted({CHECK_TOKENS.get(it.kind, 40) for it in items}):
        group = [it for it in items if CHECK_TOKENS.get(it.kind, 40) == budget]
        prompts = [[{"role": "user", "content": it.prompt}] for it in group]
        gens = generate(loaded, prompts, budget, batch_size=batch_size, progress=progress)
        out.update({it.id: (VERIFIERS[it.check["type"]](g.text, it), g.text) for it, g in zip(group, gens)})
    return [out[it.id] for it in items]


# ---------------------------------------------------------------------------------------------------------------------
# One model on the suite


@dataclass
class SuiteRun:
    """One model's item results: right (0/1) and what it answered (the chosen option, or the reply)."""

    items: list[SuiteItem]
    right: list[bool]
    answers: list[str]
    seconds: float = 0.0

    def accuracy(self, kind: str | None = None) -> float:
        rows = [r for it, r in zip(self.items, self.right) if kind is None or it.kind == kind]
        return sum(rows) / max(len(rows), 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "right": "".join("1" if r else "0" for r in self.right),
            "answers": self.answers,
            "seconds": round(self.seconds, 1),
        }

    @classmethod
    def from_json(cls, items: list[SuiteItem], data: dict[str, Any]) -> SuiteRun:
        return cls(items, [c == "1" for c in data["right"]], list(data["answers"]), float(data.get("seconds", 0)))


def run_suite(loaded: Any, items: list[SuiteItem], progress: Callable[[int], None] | None = None) -> SuiteRun:
    """Score every item with the model as loaded (eval mode; the caller decides whether its adapter is on)."""
    import time

    t0 = time.perf_counter()
    was_training = loaded.model.training
    loaded.model.eval()
    try:
        mc = [it for it in items if it.score == "choice"]
        checked = [it for it in items if it.score == "check"]
        scores = dict(zip((it.id for it in mc), score_choices(loaded, mc, progress=progress)))
        replies = dict(zip((it.id for it in checked), score_checks(loaded, checked, progress=progress)))
    finally:
        loaded.model.train(was_training)
    right, answers = [], []
    for it in items:
        if it.score == "choice":
            best = max(range(len(it.choices)), key=scores[it.id].__getitem__)
            right.append(best == it.answer)
            answers.append(it.choices[best])
        else:
            ok, text = replies[it.id]
            right.append(ok)
            answers.append(text)
    return SuiteRun(items, right, answers, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------------------------
# The base model's results, cached per base and suite


def cache_dir() -> Path:
    from psft_lite.model.runtime import home

    return home() / "retention"


IDENTITY = ("name", "gguf_file", "revision", "load_in_4bit", "double_quant", "chat_template", "trust_remote_code")


def base_key(loaded: Any, digest: str) -> str:
    """Who the base is, as it was loaded (the model section's identity keys, the resolved dtype and device) plus the
    version of what is cached: the cache file's name. A run and its base named directly share one entry."""
    base = {k: v for k, v in (loaded.base_spec or {"name": loaded.label}).items() if k in IDENTITY}
    spec = json.dumps(
        {"base": base, "dtype": str(loaded.dtype), "device": loaded.device.type, "of": digest}, sort_keys=True
    )
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def base_results(loaded: Any, items: list[SuiteItem], progress: Callable[[int], None] | None = None) -> SuiteRun:
    """The base model's results (the adapter disabled): read from the cache, else computed and cached."""
    from psft_lite.model import scoring

    path = cache_dir() / f"suite-{base_key(loaded, suite_digest(items))}.json"
    if path.is_file():
        try:
            return SuiteRun.from_json(items, json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError):
            pass  # a torn or foreign file: computed again below
    with scoring.adapter_disabled(loaded.model) if loaded.has_adapter else _nothing():
        run = run_suite(loaded, items, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"base": loaded.base_spec, **run.to_json()}) + "\n")
    return run


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


# ---------------------------------------------------------------------------------------------------------------------
# Comparison and verdict


@dataclass
class Verdict:
    """What a fine-tune did to general ability: overall and per kind, before (the base) → after (the model)."""

    overall: Change
    kinds: dict[str, Change]
    chance: dict[str, float]
    before: SuiteRun
    after: SuiteRun
    kl: float | None = None  # KL(base ‖ model) per token on the base's own answers to general prompts
    kl_prompts: int = 0
    leak: Leak | None = None  # the taught format in replies to general prompts (when the run taught one)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "overall": self.overall.as_dict(),
            "kinds": {k: {**c.as_dict(), "chance": 100 * self.chance[k]} for k, c in self.kinds.items()},
            "kl_to_base": self.kl,
            "kl_prompts": self.kl_prompts,
            **({"format_leak": self.leak.as_dict()} if self.leak else {}),
            "seconds": round(self.seconds, 1),
        }


@dataclass(frozen=True)
class Leak:
    """How many of the suite's generated replies write a taught answer format (e.g. `[[answer:`), before → after.
    The verifiers judge whether a reply names the right answer, so a reply that also appends the taught format is
    still right; this count is the change in behaviour they cannot see."""

    openings: tuple[str, ...]
    n: int  # generated (checked) replies
    before: int
    after: int

    def as_dict(self) -> dict[str, Any]:
        return {"openings": list(self.openings), "n": self.n, "before": self.before, "after": self.after}


def leaked(reply: str, openings: tuple[str, ...] | list[str]) -> bool:
    return any(o in reply for o in openings)


def format_leak(before: SuiteRun, after: SuiteRun, openings: tuple[str, ...] | list[str]) -> Leak | None:
    """The taught formats' openings in the generated replies, base and model; None when nothing was taught or no
    reply was generated (only multiple-choice kinds scored)."""
    openings = tuple(o for o in openings if o)
    idx = [i for i, it in enumerate(after.items) if it.score == "check"]
    if not openings or not idx:
        return None
    count = lambda run: sum(leaked(run.answers[i], openings) for i in idx)  # noqa: E731
    return Leak(openings, len(idx), count(before), count(after))


def compare(before: SuiteRun, after: SuiteRun) -> Verdict:
    kinds = list(dict.fromkeys(it.kind for it in after.items))
    per_kind, chance = {}, {}
    for kind in kinds:
        idx = [i for i, it in enumerate(after.items) if it.kind == kind]
        per_kind[kind] = paired_change([before.right[i] for i in idx], [after.right[i] for i in idx])
        chance[kind] = sum(after.items[i].chance for i in idx) / len(idx)
    return Verdict(paired_change(before.right, after.right), per_kind, chance, before, after)


def _signed(x: float) -> str:
    return f"{x:+.1f}"


def verdict_line(v: Verdict) -> str:
    """The one line scripts may parse: `general ability: 61.2 % → 59.8 % (-1.4 [-2.6, -0.3] points on 1,240 items;
    31 right→wrong, 14 wrong→right)`."""
    c = v.overall
    return (
        f"general ability: {c.before:.1f} % → {c.after:.1f} % ({_signed(c.delta)} [{_signed(c.low)}, "
        f"{_signed(c.high)}] points on {c.n:,} items; {c.right_to_wrong} right→wrong, {c.wrong_to_right} wrong→right)"
    )


def kind_lines(v: Verdict) -> list[str]:
    lines = []
    for kind, c in v.kinds.items():
        lines.append(
            f"  {kind:<15} {c.before:5.1f} % → {c.after:5.1f} %  ({_signed(c.delta)} [{_signed(c.low)}, "
            f"{_signed(c.high)}] on {c.n} items; chance {100 * v.chance[kind]:.0f} %; {c.right_to_wrong} right→wrong, "
            f"{c.wrong_to_right} wrong→right)"
        )
    return lines


def kl_line(v: Verdict) -> str | None:
    if v.kl is None:
        return None
    return (
        f"KL to the base: {v.kl:.3f} nats/token on its own answers to {v.kl_prompts} general prompts (secondary: the "
        "quantity sft_kl's penalty minimises)"
    )


def leak_line(v: Verdict) -> str | None:
    if v.leak is None:
        return None
    x = v.leak
    shown = " or ".join(repr(o) for o in x.openings)
    return (
        f"taught format in general replies: {x.before} → {x.after} of {x.n} (replies that write {shown} where no one "
        "asked for it; the verifiers may still count them right)"
    )


def report_lines(v: Verdict, per_kind: bool = False) -> list[str]:
    """What `eval --retention` and the end of `train` print: the verdict, optionally a line per kind, the taught
    format's leak into general replies (when the run taught one), and the KL."""
    extra = [line for line in (leak_line(v), kl_line(v)) if line]
    return [verdict_line(v), *(kind_lines(v) if per_kind else []), *extra]


def gate(v: Verdict, max_forgetting: float | None) -> str | None:
    """The reason a run fails `--max-forgetting POINTS`, or None: it fails when the drop is beyond the threshold with
    confidence, i.e. the whole 95 % paired interval of the change lies below −POINTS."""
    if max_forgetting is None or not v.overall.beyond(max_forgetting):
        return None
    c = v.overall
    return (
        f"forgetting gate: general ability fell {-c.delta:.1f} points ({_signed(c.low)} to {_signed(c.high)} with 95 % "
        f"confidence on {c.n:,} items), beyond the {max_forgetting:g} allowed."
    )


# ---------------------------------------------------------------------------------------------------------------------
# KL to the base on its own answers (secondary), and the whole verdict

PROMPTS_FILE = SUITE_FILE.parent / "prompts.jsonl"  # 300 general prompts of many kinds (psft_lite.study.benchmark)
REFERENCE_TOKENS = 160


def read_prompts(path: Path = PROMPTS_FILE) -> list[dict[str, Any]]:
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]


def spread(rows: list[Any], n: int | None) -> list[Any]:
    """`n` rows spread evenly over `rows` (the prompts are ordered by kind, so every kind is represented)."""
    if n is None or n >= len(rows):
        return list(rows)
    return [rows[round(i * (len(rows) - 1) / max(n - 1, 1))] for i in range(n)] if n > 1 else rows[:1]


def reference_answers(loaded: Any, prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The base model's own greedy answers to `prompts` (the adapter disabled): cached per base under
    $PSFT_LITE_HOME/retention/, so each prompt is answered once per base model; returns prompt/completion rows."""
    from psft_lite.inference.generate import generate
    from psft_lite.model import scoring

    path = cache_dir() / f"answers-{base_key(loaded, 'answers')}.jsonl"
    known: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                known[row["id"]] = row
            except (ValueError, KeyError):
                continue
    todo = [p for p in prompts if p["id"] not in known or known[p["id"]]["prompt"] != p["prompt"]]
    if todo:
        with scoring.adapter_disabled(loaded.model) if loaded.has_adapter else _nothing():
            gens = generate(loaded, [[{"role": "user", "content": p["prompt"]}] for p in todo], REFERENCE_TOKENS)
        for p, g in zip(todo, gens):
            known[p["id"]] = {"id": p["id"], "prompt": p["prompt"], "completion": g.text, "finished": g.finished}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in known.values()))
    return [known[p["id"]] for p in prompts]


def kl_to_base(loaded: Any, rows: list[dict[str, Any]]) -> float:
    """Mean KL(p_base ‖ p_model) per token on the base's answers (0 for a plain model: it is its own base)."""
    from psft_lite.inference.evaluate import EvalItem, kl_rows

    items = [EvalItem([{"role": "user", "content": r["prompt"]}], r["completion"], None, r["id"]) for r in rows]
    sums = kl_rows(loaded, items)
    return sum(s for s, _ in sums) / max(sum(n for _, n in sums), 1)


def base_cached(loaded: Any, items: list[SuiteItem]) -> bool:
    return (cache_dir() / f"suite-{base_key(loaded, suite_digest(items))}.json").is_file()


def evaluate_retention(
    loaded: Any,
    items: list[SuiteItem] | None = None,
    kl_prompts: int | None = 60,
    console: Any = None,
    taught: tuple[str, ...] | list[str] = (),
) -> Verdict:
    """The verdict on a model: the suite scored by the model and by its base (cached), compared item by item; the
    openings of the formats the run `taught` counted in its general replies; and the KL to the base on its own answers
    to `kl_prompts` general prompts (None: all 300; 0: no KL). A plain model is compared with itself. With a console, a
    progress bar over the items to score."""
    import time

    from psft_lite.inference.evaluate import progress_bar

    t0 = time.perf_counter()
    items = items if items is not None else load_suite()
    passes = (0 if base_cached(loaded, items) else 1) + (1 if loaded.has_adapter else 0)
    with progress_bar(console, len(items) * passes, "retention") as advance:
        advance(0, "base model" if not base_cached(loaded, items) else "")
        before = base_results(loaded, items, advance)
        advance(0, "")
        after = run_suite(loaded, items, advance) if loaded.has_adapter else before
    verdict = compare(before, after)
    verdict.leak = format_leak(before, after, taught)
    if kl_prompts != 0:
        rows = reference_answers(loaded, spread(read_prompts(), kl_prompts))
        verdict.kl, verdict.kl_prompts = kl_to_base(loaded, rows), len(rows)
    verdict.seconds = time.perf_counter() - t0
    return verdict


def write_verdict(out: Path, v: Verdict) -> None:
    """summary (retention.json) and the per-item results with the model's answers (retention-items.jsonl), so anyone
    can recheck a verdict."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "retention.json", json.dumps(v.as_dict(), indent=2) + "\n")
    rows = [
        {"id": it.id, "kind": it.kind, "before": b, "after": a, "answer_before": x, "answer_after": y}
        for it, b, a, x, y in zip(v.after.items, v.before.right, v.after.right, v.before.answers, v.after.answers)
    ]
    atomic_write_text(out / "retention-items.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
