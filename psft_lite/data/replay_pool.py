"""The default self-replay prompt pool: general requests (explain, advise, describe, write, compare, plan) written for
psft-lite. Self-replay trains on the base model's own greedy answers to them, so a fine-tune keeps being pulled back
towards what the model already did (recipe key `data.replay`).

The pool shares no prompt with the retention suite, the general prompts its KL is measured on, or any evaluation set
shipped in the repository (a test checks it), so replay cannot teach an evaluation its answers.

    python -m psft_lite.data.replay_pool     # regenerates psft_lite/data/replay/prompts.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

POOL = Path(__file__).resolve().parent / "replay" / "prompts.jsonl"

CONCEPTS = [
    "compound interest",
    "a rainbow",
    "photosynthesis in a leaf",
    "how a bicycle gear works",
    "a budget",
    "recycling",
    "a volcano",
    "the water cycle",
    "how vaccines train the immune system",
    "a time zone",
    "inflation",
    "a password manager",
    "how bread rises",
    "a solar eclipse",
    "a food chain",
    "an election",
    "how a refrigerator keeps food cold",
    "a library card",
    "a mortgage",
    "composting",
    "a thunderstorm",
    "how a compass works",
    "a savings account",
    "a fever",
    "how glasses help people see",
    "a recipe",
    "a spreadsheet",
    "an email signature",
    "a museum",
    "a lighthouse",
    "a seed bank",
    "an orchestra",
    "how a lock and key work",
    "a map legend",
    "a weather forecast",
    "a healthy sleep routine",
    "a cover letter",
    "a podcast",
    "a crossword puzzle",
    "a garden pond",
]
ACTIVITIES = [
    "learning to cook",
    "running a first 5 km race",
    "keeping a houseplant alive",
    "studying for an exam",
    "saving money each month",
    "learning to play the guitar",
    "writing a diary",
    "painting a room",
    "packing for a weekend trip",
    "starting a vegetable garden",
    "taking better photos with a phone",
    "keeping a desk tidy",
    "learning a new language",
    "baking cookies",
    "planning a picnic",
    "training a puppy",
    "making new friends in a new town",
    "reading more books",
    "drinking more water",
    "cycling to work",
    "preparing for a job interview",
    "organizing a birthday party",
    "staying calm before a presentation",
    "camping for the first time",
    "making a budget for groceries",
    "learning to swim",
    "cleaning a kitchen",
    "writing a thank-you note",
    "keeping a plant on a windowsill",
    "taking care of a goldfish",
]
SUBJECTS = [
    "a lost umbrella",
    "a lighthouse keeper",
    "a robot that learns to paint",
    "an old wooden boat",
    "a fox in a snowy forest",
    "a girl who finds a map",
    "a town with no clocks",
    "a friendly dragon",
    "a train that runs at night",
    "a cat who wants to fly",
    "the first day of school",
    "a garden at dawn",
    "a baker who works at midnight",
    "a message in a bottle",
    "a mountain village",
    "a kite stuck in a tree",
    "an astronaut's first meal in space",
    "a rainy market",
    "a violin in an attic",
    "two friends on a long walk",
    "a library that never closes",
    "a snowman in spring",
    "a tiny island",
    "a bee that gets lost",
    "a street musician",
    "a broken watch",
    "a picnic interrupted by rain",
    "a boy and his grandfather",
    "an autumn festival",
    "a paper airplane",
]
PAIRS = [
    ("a lake", "a sea"),
    ("a pond", "a lake"),
    ("a cup", "a mug"),
    ("jogging", "sprinting"),
    ("a hobby", "a job"),
    ("a city", "a village"),
    ("a novel", "a short story"),
    ("a bus", "a tram"),
    ("a poem", "a song"),
    ("renting", "buying a home"),
    ("a map", "a globe"),
    ("a diary", "a blog"),
    ("tea", "coffee"),
    ("a violin", "a cello"),
    ("a hill", "a mountain"),
    ("a letter", "an email"),
    ("a museum", "a gallery"),
    ("a river", "a canal"),
    ("baking", "frying"),
    ("a friend", "a colleague"),
]
TASKS = [
    "boil an egg",
    "brew a pot of coffee",
    "change a bicycle tire",
    "write a polite complaint",
    "make a simple salad",
    "plan a weekly meal schedule",
    "fold a paper airplane",
    "set up a morning routine",
    "remove a coffee stain",
    "write a short speech for a friend's wedding",
    "start a book club",
    "organize photos on a computer",
    "prepare for a long flight",
    "clean a laptop keyboard",
    "plant a tree",
    "write a shopping list",
    "choose a good watermelon",
    "make a paper lantern",
    "back up important files",
    "welcome a new neighbor",
    "sew on a button",
    "plan a road trip",
    "make pancakes",
    "care for a sunburn",
    "repot a plant",
    "keep bread fresh",
    "write a haiku",
    "pick a birthday gift",
    "keep a conversation going",
    "make a simple budget",
]


def build(seed: int = 0) -> list[dict[str, str]]:
    """The pool as {"id", "prompt"} rows; deterministic."""
    prompts: list[str] = []
    for c in CONCEPTS:
        prompts += [
            f"Explain {c} to a ten-year-old.",
            f"Why does {c} matter in everyday life?",
            f"Describe {c} in a short paragraph.",
            f"What is a common misunderstanding about {c}?",
        ]
    for a in ACTIVITIES:
        prompts += [
            f"Give me three tips for {a}.",
            f"What mistakes do beginners make when {a}?",
            f"I want to get better at {a}. Where should I start?",
            f"Make a one-week plan for {a}.",
        ]
    for s in SUBJECTS:
        prompts += [
            f"Write a short story about {s}.",
            f"Write a four-line poem about {s}.",
            f"Describe a picture of {s}.",
            f"Write the opening sentence of a story about {s}.",
        ]
    for a, b in PAIRS:
        prompts += [f"What is the difference between {a} and {b}?", f"Would you rather have {a} or {b}? Explain why."]
    for t in TASKS:
        prompts += [f"How do I {t}?", f"Write step-by-step instructions to {t}.", f"What do I need to {t}?"]
    r = random.Random(seed)
    r.shuffle(prompts)
    return [{"id": f"replay-{i + 1:03d}", "prompt": p} for i, p in enumerate(prompts)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=POOL)
    args = ap.parse_args()
    rows = build()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {args.out}: {len(rows)} prompts")


if __name__ == "__main__":  # pragma: no cover
    main()
