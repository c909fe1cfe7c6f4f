"""The general-ability retention suite: checkable items of many kinds, written for psft-lite, that measure what a
model can still do after a fine-tune (`psft-lite eval MODEL --retention`).

Two ways of scoring, each where it fits:
- `choice` items (most of them) are multiple choice scored by log-likelihood: each option is scored as the whole
  assistant reply to the prompt (its tokens and the end-of-turn token, under the chat template), and the item is right
  when the right option scores highest. No generation: cheap, and stable under small numeric changes.
- `check` items are answered greedily (short replies) and checked by a strict verifier: the reply names the right
  answer and no other candidate of a closed set, its last number equals the answer, it repeats a sentence exactly, or
  it keeps a verifiable instruction (a list of N lines, no commas). No substring matching: "365 * 12 = 312 months" is
  not "12", and "Paris or Rome" is not "Paris".

    python -m psft_lite.data.suite     # regenerates the shipped file, psft_lite/data/retention/suite.jsonl

The generator is seeded and deterministic; the word lists and questions are in `suite_items.py`.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from psft_lite.data import suite_items as S

SUITE = Path(__file__).resolve().parent / "retention" / "suite.jsonl"

Item = dict[str, Any]


def choice(kind: str, prompt: str, answer: str, distractors: list[str], r: random.Random) -> Item:
    """A multiple-choice item: the options shuffled, `answer` the index of the right one."""
    options = [answer, *distractors]
    if len(set(options)) != len(options):
        raise ValueError(f"{kind}: duplicate options in {options}")
    r.shuffle(options)
    return {"kind": kind, "prompt": prompt, "score": "choice", "choices": options, "answer": options.index(answer)}


def check(kind: str, prompt: str, verifier: str, **params: Any) -> Item:
    """A generated item checked by `verifier` (psft_lite.inference.retention.VERIFIERS) with `params`."""
    return {"kind": kind, "prompt": prompt, "score": "check", "check": {"type": verifier, **params}}


def _pick(r: random.Random, pool: list[str], avoid: set[str], n: int) -> list[str]:
    return r.sample([x for x in pool if x not in avoid], n)


# ---------------------------------------------------------------------------------------------------------------------
# Multiple choice


def facts(r: random.Random) -> list[Item]:
    capitals = [c for _, c in S.CAPITALS]
    countries = [c for c, _ in S.CAPITALS]
    out = []
    for country, capital in S.CAPITALS:
        out.append(choice("fact", f"What is the capital of {country}?", capital, _pick(r, capitals, {capital}, 3), r))
        out.append(
            choice("fact", f"{capital} is the capital of which country?", country, _pick(r, countries, {country}, 3), r)
        )
    for country, continent in S.CONTINENTS.items():
        wrong = _pick(r, S.CONTINENT_NAMES, {continent}, 3)
        out.append(choice("fact", f"On which continent is {country}?", continent, wrong, r))
    languages = sorted({lang for _, lang in S.LANGUAGES})
    for country, language in S.LANGUAGES:
        wrong = _pick(r, languages, {language}, 3)
        out.append(choice("fact", f"What is the main language spoken in {country}?", language, wrong, r))
    return out


def opposites(r: random.Random) -> list[Item]:
    group = {w: i for i, g in enumerate(S.OPPOSITE_GROUPS) for w in g}
    words = [w for pair in S.OPPOSITES for w in pair]
    out = []
    for a, b in S.OPPOSITES:
        for word, opposite in ((a, b), (b, a)):
            clash = {w for w in words if w in (a, b) or (word in group and group.get(w) == group[word])}
            out.append(
                choice(
                    "opposite",
                    f"What is the opposite of '{word}'? Answer with one word.",
                    opposite,
                    _pick(r, words, clash, 3),
                    r,
                )
            )
    return out


def word_forms(r: random.Random) -> list[Item]:
    out = []
    for word, plural in S.PLURALS:
        wrong = [w for w in dict.fromkeys([word + "s", word + "es", word]) if w != plural]
        out.append(choice("word_form", f"What is the plural of '{word}'?", plural, wrong[:3], r))
    for verb, past in S.PAST_TENSES:
        wrong = [w for w in dict.fromkeys([verb + "ed", verb + "s", past + "ed"]) if w != past]
        out.append(choice("word_form", f"What is the past tense of '{verb}'?", past, wrong[:3], r))
    for adj, comp in S.COMPARATIVES:
        wrong = [w for w in dict.fromkeys([adj + "er", "more " + adj, adj + "est", adj]) if w != comp]
        out.append(choice("word_form", f"What is the comparative form of '{adj}'?", comp, wrong[:3], r))
    return out


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def categories(r: random.Random) -> list[Item]:
    names = list(S.CATEGORIES)
    out = []
    for cat, members in S.CATEGORIES.items():
        others = [c for c in names if c != cat and (cat, c) not in S.CATEGORY_CLASHES]
        for member in members:
            wrong = [r.choice(S.CATEGORIES[c]) for c in r.sample(others, 3)]
            out.append(choice("category", f"Which of these is {_a(cat)}?", member, wrong, r))
            wrong = [_a(c) for c in r.sample(others, 3)]
            out.append(choice("category", f"What kind of thing is {_a(member)}?", _a(cat), wrong, r))
    return out


def hand_written(kind: str, rows: list[tuple[str, str, list[str]]], r: random.Random) -> list[Item]:
    return [choice(kind, q, a, list(d), r) for q, a, d in rows]


def instructions(r: random.Random) -> list[Item]:
    """Instructions whose every answer can be verified mechanically (IFEval's idea, items written for psft-lite).
    Only constraints the embedded base model follows at a useful rate are kept (docs/retention.md): copying a
    sentence, a list of N lines, a sentence without commas."""
    out = []
    for s in S.SENTENCES:
        out.append(
            check("instruction", f"Repeat this sentence exactly and write nothing else:\n{s}", "exact", answer=s)
        )
    for kind in S.LIST_KINDS:
        for n in (2, 3, 4):
            out.append(check("instruction", f"List {n} {kind}, one per line, with no other text.", "lines", n=n))
    for t in S.TOPICS:
        out.append(
            check("instruction", f"Write one sentence about {t} without using any commas.", "no_commas", min_words=4)
        )
    return out


def short_answers(r: random.Random) -> list[Item]:
    """Questions with a short answer, generated and checked strictly: the reply must name the right answer and no other
    candidate of the question's closed set (every capital, every opposite), or end with the right number."""
    out = []
    capitals = [c for _, c in S.CAPITALS]
    for country, capital in S.CAPITALS:
        out.append(
            check("short_answer", f"What is the capital of {country}?", "names", answer=capital, candidates=capitals)
        )
    words = sorted({w for pair in S.OPPOSITES for w in pair})
    for word, opposite in r.sample(S.OPPOSITES, 50):
        out.append(
            check("short_answer", f"What is the opposite of '{word}'?", "names", answer=opposite, candidates=words)
        )
    seen: set[tuple[int, int]] = set()
    while len(seen) < 50:
        x, y = r.randint(2, 12), r.randint(2, 12)
        if (x, y) in seen:
            continue
        seen.add((x, y))
        out.append(check("short_answer", f"What is {x} + {y}?", "number", answer=str(x + y)))
    return out


KINDS = {
    "fact": facts,
    "opposite": opposites,
    "word_form": word_forms,
    "category": categories,
    "word_knowledge": lambda r: hand_written("word_knowledge", S.WORD_KNOWLEDGE, r),
    "commonsense": lambda r: hand_written("commonsense", S.COMMONSENSE, r),
    "science": lambda r: hand_written("science", S.SCIENCE, r),
    "instruction": instructions,
    "short_answer": short_answers,
}


def build(seed: int = 0, kinds: dict = KINDS) -> list[Item]:
    """Every item, with a stable id (`kind-NNN`), in kind order."""
    items: list[Item] = []
    for kind, make in kinds.items():
        made = make(random.Random(f"{seed}-{kind}"))
        items += [{"id": f"{kind}-{i + 1:03d}", **item} for i, item in enumerate(made)]
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=SUITE)
    args = ap.parse_args()
    items = build()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), encoding="utf-8")
    counts: dict[str, int] = {}
    for it in items:
        counts[it["kind"]] = counts.get(it["kind"], 0) + 1
    print(f"wrote {args.out}: {len(items)} items; " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":  # pragma: no cover
    main()
