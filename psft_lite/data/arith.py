"""A seeded generator of GSM8K-style arithmetic word problems with checkable `#### N` answers.

Ten templates are "in-domain" (train and held-out test sets); five more are never trained on and make the
out-of-domain set; five more, mostly one-step problems in new wordings, make the transfer set (`transfer.jsonl`, 320
problems): the taught skill where the base model solves about a fifth of the problems, so transfer can go up or
down (the OOD set sits at the floor: the base solves 2.5 %). Each solution reasons step by step and ends with
`#### <answer>` as GSM8K does. `format_train` (the first 400 training problems) and `format_test` (the held-out ones)
end with `[[answer: N]]` instead: an output format the base model never writes, scored only when written exactly so.

    python -m psft_lite.data.arith --out data/arith     # regenerates every set (the existing ones byte-identical)
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

NAMES = ["Tom", "Anna", "Ben", "Maria", "Leo", "Sara", "Omar", "Julia", "Ken", "Lucy", "Ravi", "Emma", "Noah", "Mia"]
PRONOUN = {"Tom": "he", "Ben": "he", "Leo": "he", "Omar": "he", "Ken": "he", "Ravi": "he", "Noah": "he"}
ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "books", "cards", "shells", "coins", "stamps"]

Problem = tuple[str, str, int]  # question, solution, answer


def _pron(name: str) -> str:
    return PRONOUN.get(name, "she")


def _two_names(r: random.Random) -> tuple[str, str]:
    a, b = r.sample(NAMES, 2)
    return a, b


def buy_more(r: random.Random) -> Problem:
    n, item, a, b = r.choice(NAMES), r.choice(ITEMS), r.randint(3, 60), r.randint(2, 40)
    q = f"{n} has {a} {item}. {_pron(n).capitalize()} buys {b} more. How many {item} does {n} have now?"
    s = f"{n} starts with {a} {item} and buys {b} more, so {_pron(n)} has {a} + {b} = {a + b} {item}."
    return q, s, a + b


def give_away(r: random.Random) -> Problem:
    n, m = _two_names(r)
    item, a = r.choice(ITEMS), r.randint(10, 80)
    b = r.randint(1, a - 1)
    q = f"{n} has {a} {item} and gives {b} of them to {m}. How many {item} does {n} have left?"
    s = f"{n} gives away {b} of {a} {item}, so {_pron(n)} has {a} - {b} = {a - b} {item} left."
    return q, s, a - b


def buy_then_give(r: random.Random) -> Problem:
    n, m = _two_names(r)
    item, a, b = r.choice(ITEMS), r.randint(5, 50), r.randint(2, 30)
    c = r.randint(1, a + b - 1)
    q = (
        f"{n} has {a} {item}. {_pron(n).capitalize()} buys {b} more and then gives {c} to {m}. How many {item} does "
        f"{n} have now?"
    )
    s = (
        f"After buying, {n} has {a} + {b} = {a + b} {item}. After giving {c} to {m}, {_pron(n)} has {a + b} - {c} = "
        f"{a + b - c} {item}."
    )
    return q, s, a + b - c


def packs(r: random.Random) -> Problem:
    n, item, a, b = r.choice(NAMES), r.choice(ITEMS), r.randint(2, 12), r.randint(2, 12)
    q = f"{n} buys {a} packs of {item}. Each pack has {b} {item}. How many {item} does {n} buy in total?"
    s = f"There are {a} packs with {b} {item} each, so {n} buys {a} * {b} = {a * b} {item}."
    return q, s, a * b


def share(r: random.Random) -> Problem:
    n, item, each, k = r.choice(NAMES), r.choice(ITEMS), r.randint(2, 15), r.randint(2, 9)
    total = each * k
    q = f"{n} has {total} {item} and shares them equally among {k} friends. How many {item} does each friend get?"
    s = f"{total} {item} shared equally among {k} friends gives {total} / {k} = {each} {item} each."
    return q, s, each


def cost(r: random.Random) -> Problem:
    n, item, p, k = r.choice(NAMES), r.choice(ITEMS), r.randint(2, 15), r.randint(2, 10)
    q = f"{item.capitalize()} cost ${p} each. {n} buys {k} {item}. How many dollars does {n} spend?"
    s = f"{k} {item} at ${p} each cost {k} * {p} = ${k * p}."
    return q, s, k * p


def change(r: random.Random) -> Problem:
    n, item, p, k = r.choice(NAMES), r.choice(ITEMS), r.randint(2, 9), r.randint(2, 8)
    m = k * p + r.randint(1, 40)
    q = f"{n} has ${m}. {_pron(n).capitalize()} buys {k} {item} for ${p} each. How many dollars does {n} have left?"
    s = f"The {item} cost {k} * {p} = ${k * p}. {n} has {m} - {k * p} = ${m - k * p} left."
    return q, s, m - k * p


def more_than(r: random.Random) -> Problem:
    n, m = _two_names(r)
    item, a, b = r.choice(ITEMS), r.randint(3, 40), r.randint(1, 20)
    q = f"{n} has {a} {item}. {m} has {b} more {item} than {n}. How many {item} do they have together?"
    s = f"{m} has {a} + {b} = {a + b} {item}. Together they have {a} + {a + b} = {2 * a + b} {item}."
    return q, s, 2 * a + b


def daily(r: random.Random) -> Problem:
    n, a, d = r.choice(NAMES), r.randint(2, 25), r.randint(2, 9)
    q = f"{n} reads {a} pages every day. How many pages does {n} read in {d} days?"
    s = f"In {d} days {n} reads {d} * {a} = {a * d} pages."
    return q, s, a * d


def eaten(r: random.Random) -> Problem:
    n, m = _two_names(r)
    a = r.randint(12, 60)
    b = r.randint(1, a // 2)
    c = r.randint(1, a - b - 1)
    q = f"A box has {a} cookies. {n} eats {b} cookies and {m} eats {c} cookies. How many cookies are left in the box?"
    s = f"They eat {b} + {c} = {b + c} cookies, so {a} - {b + c} = {a - b - c} cookies are left."
    return q, s, a - b - c


# --- out-of-domain templates: never used for training ---------------------------------------------------------------


def speed(r: random.Random) -> Problem:
    v, h = r.randint(20, 90), r.randint(2, 6)
    q = f"A train travels at {v} kilometers per hour. How many kilometers does it travel in {h} hours?"
    s = f"Distance is speed times time: {v} * {h} = {v * h} kilometers."
    return q, s, v * h


def ages(r: random.Random) -> Problem:
    n, m = _two_names(r)
    a, k = r.randint(3, 12), r.randint(2, 4)
    q = f"{n} is {a} years old. {m} is {k} times as old as {n}. How old will {m} be in 5 years?"
    s = f"{m} is {k} * {a} = {k * a} years old now. In 5 years {m} will be {k * a} + 5 = {k * a + 5}."
    return q, s, k * a + 5


def average(r: random.Random) -> Problem:
    n = r.choice(NAMES)
    mean = r.randint(50, 95)
    d1, d2 = r.randint(1, 5), r.randint(1, 5)
    xs = [mean - d1, mean + d2, mean + d1 - d2]
    q = f"{n} scored {xs[0]}, {xs[1]} and {xs[2]} points on three tests. What is {n}'s average score?"
    s = f"The total is {xs[0]} + {xs[1]} + {xs[2]} = {sum(xs)}. The average is {sum(xs)} / 3 = {mean}."
    return q, s, mean


def rectangle(r: random.Random) -> Problem:
    w, h = r.randint(2, 20), r.randint(2, 20)
    q = f"A garden is {w} meters long and {h} meters wide. How many meters of fence go around it?"
    s = f"The perimeter is 2 * ({w} + {h}) = 2 * {w + h} = {2 * (w + h)} meters."
    return q, s, 2 * (w + h)


def half_left(r: random.Random) -> Problem:
    n, item, a = r.choice(NAMES), r.choice(ITEMS), 2 * r.randint(5, 40)
    b = r.randint(1, a // 2 - 1)
    q = (
        f"{n} had {a} {item}. {_pron(n).capitalize()} lost half of them and then found {b}. How many {item} does {n} "
        "have now?"
    )
    s = f"Half of {a} is {a} / 2 = {a // 2}. After finding {b}, {n} has {a // 2} + {b} = {a // 2 + b} {item}."
    return q, s, a // 2 + b


# --- transfer templates: the taught skill (arithmetic word problems) in wordings never trained on, mostly one step, so
# the base model solves a fair share of them (data/arith/transfer.jsonl; calibrated in docs/retention.md) -----------


def bakery(r: random.Random) -> Problem:
    a, b = r.randint(5, 40), r.randint(5, 40)
    q = f"A bakery made {a} muffins in the morning and {b} muffins in the afternoon. How many muffins did it make?"
    return q, f"It made {a} + {b} = {a + b} muffins.", a + b


def birds(r: random.Random) -> Problem:
    a = r.randint(8, 40)
    b = r.randint(1, a - 1)
    q = f"There were {a} birds on a tree. {b} of them flew away. How many birds are still on the tree?"
    return q, f"{a} - {b} = {a - b} birds are still on the tree.", a - b


def rows_of_desks(r: random.Random) -> Problem:
    a, b = r.randint(2, 12), r.randint(2, 12)
    q = f"A classroom has {a} rows of desks with {b} desks in each row. How many desks are in the classroom?"
    return q, f"There are {a} * {b} = {a * b} desks.", a * b


def piles(r: random.Random) -> Problem:
    k, each = r.randint(2, 6), r.randint(2, 10)
    q = f"{k * each} stickers are put into {k} equal piles. How many stickers are in each pile?"
    return q, f"Each pile has {k * each} / {k} = {each} stickers.", each


def bus(r: random.Random) -> Problem:
    a = r.randint(10, 40)
    b, c = r.randint(1, a - 1), r.randint(1, 15)
    q = (
        f"A bus had {a} passengers. At the next stop {b} got off and {c} got on. How many passengers are on the bus "
        "now?"
    )
    return q, f"{a} - {b} = {a - b}, then {a - b} + {c} = {a - b + c} passengers.", a - b + c


def price_pair(r: random.Random) -> Problem:
    p, q_ = r.randint(3, 30), r.randint(3, 30)
    q = f"A shirt costs {p} dollars and a hat costs {q_} dollars. How many dollars do they cost together?"
    return q, f"Together they cost {p} + {q_} = {p + q_} dollars.", p + q_


def twice_as_far(r: random.Random) -> Problem:
    n, a = r.choice(NAMES), r.randint(2, 15)
    q = f"{n} walked {a} kilometers on Monday and twice as far on Tuesday. How many kilometers did {n} walk on Tuesday?"
    return q, f"Twice {a} is 2 * {a} = {2 * a} kilometers.", 2 * a


def farm_animals(r: random.Random) -> Problem:
    a, b = r.randint(3, 30), r.randint(3, 30)
    q = f"A farmer has {a} chickens and {b} cows. How many animals does the farmer have?"
    return q, f"The farmer has {a} + {b} = {a + b} animals.", a + b


def candies_eaten(r: random.Random) -> Problem:
    a = r.randint(10, 60)
    b = r.randint(1, a - 1)
    q = f"A jar held {a} candies before a party. After the party {b} candies are left. How many candies were eaten?"
    return q, f"{a} - {b} = {a - b} candies were eaten.", a - b


def wheels(r: random.Random) -> Problem:
    n = r.randint(2, 12)
    q = f"Each car has 4 wheels. How many wheels do {n} cars have?"
    return q, f"{n} cars have {n} * 4 = {4 * n} wheels.", 4 * n


def years_ago(r: random.Random) -> Problem:
    n, a = r.choice(NAMES), r.randint(10, 60)
    b = r.randint(2, a - 2)
    q = f"{n} is {a} years old. How old was {n} {b} years ago?"
    return q, f"{a} - {b} = {a - b}, so {n} was {a - b}.", a - b


def pages_left(r: random.Random) -> Problem:
    n, a = r.choice(NAMES), r.randint(20, 90)
    b = r.randint(1, a - 1)
    q = f"A book has {a} pages. {n} has read {b} pages. How many pages are left to read?"
    return q, f"{a} - {b} = {a - b} pages are left.", a - b


def balls_in_box(r: random.Random) -> Problem:
    a, b = r.randint(2, 9), r.randint(2, 9)
    q = f"A box has {a} red balls and {b} blue balls. How many balls are in the box?"
    return q, f"There are {a} + {b} = {a + b} balls.", a + b


def garden_rows(r: random.Random) -> Problem:
    a, b = r.randint(2, 12), r.randint(2, 12)
    q = f"A garden has {a} rows of flowers with {b} flowers in each row. How many flowers are in the garden?"
    return q, f"There are {a} * {b} = {a * b} flowers.", a * b


def baby_animals(r: random.Random) -> Problem:
    a, b = r.randint(2, 9), r.randint(2, 9)
    q = f"A cat has {a} kittens and a dog has {b} puppies. How many baby animals are there in all?"
    return q, f"There are {a} + {b} = {a + b} baby animals.", a + b


def weeks_days(r: random.Random) -> Problem:
    a = r.randint(2, 9)
    q = f"A week has 7 days. How many days are there in {a} weeks?"
    return q, f"There are {a} * 7 = {7 * a} days.", 7 * a


TRANSFER: list[Callable[[random.Random], Problem]] = [
    price_pair,
    garden_rows,
    rows_of_desks,
    farm_animals,
    twice_as_far,
]
#: transfer templates tried and dropped: the base solved 0-15 % of their problems, most answers rambling past the
#: length limit (docs/retention.md has the calibration)
TRANSFER_DROPPED = [
    bakery,
    birds,
    piles,
    bus,
    candies_eaten,
    wheels,
    years_ago,
    pages_left,
    balls_in_box,
    baby_animals,
    weeks_days,
]


IN_DOMAIN: list[Callable[[random.Random], Problem]] = [
    buy_more,
    give_away,
    buy_then_give,
    packs,
    share,
    cost,
    change,
    more_than,
    daily,
    eaten,
]
OUT_OF_DOMAIN: list[Callable[[random.Random], Problem]] = [speed, ages, average, rectangle, half_left]


def generate(
    n: int, templates: list[Callable[[random.Random], Problem]], seed: int, exclude: set[str] = frozenset()
) -> list[dict]:
    """`n` distinct problems as {"prompt", "completion", "answer", "template"} rows (completion ends `#### N`)."""
    r = random.Random(seed)
    rows, seen = [], set(exclude)
    while len(rows) < n:
        t = r.choice(templates)
        q, s, ans = t(r)
        if q in seen:
            continue
        seen.add(q)
        rows.append({"prompt": q, "completion": f"{s}\n#### {ans}", "answer": str(ans), "template": t.__name__})
    return rows


#: A final-answer format no chat model writes unprompted: the "does each method learn what it is taught?" task.
NEW_FORMAT = "[[answer: {answer}]]"


def with_new_format(rows: list[dict]) -> list[dict]:
    """The same problems with the solution's last line `#### N` replaced by NEW_FORMAT; scored by that format
    (`match = "format"`: right only when the answer is written exactly so)."""
    out = []
    for row in rows:
        solution, _, _ = row["completion"].rpartition("\n#### ")
        tagged = NEW_FORMAT.replace("{answer}", row["answer"])
        out.append({**row, "completion": f"{solution}\n{tagged}", "match": "format", "format": NEW_FORMAT})
    return out


def write_sets(
    out: Path, n_train: int = 2000, n_test: int = 200, n_ood: int = 200, n_transfer: int = 320
) -> dict[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    train = generate(n_train, IN_DOMAIN, seed=1)
    test = generate(n_test, IN_DOMAIN, seed=2, exclude={row["prompt"] for row in train})
    ood = generate(n_ood, OUT_OF_DOMAIN, seed=3)
    sizes = {}
    sets = {"train": train, "test": test, "ood": ood}
    sets |= {"format_train": with_new_format(train[:400]), "format_test": with_new_format(test)}
    sets["transfer"] = generate(n_transfer, TRANSFER, seed=4)
    for name, rows in sets.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        sizes[name] = len(rows)
    return sizes


if __name__ == "__main__":  # pragma: no cover
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("data/arith"))
    args = ap.parse_args()
    print(write_sets(args.out))
