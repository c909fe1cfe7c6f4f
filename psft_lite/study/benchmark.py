"""The general-retention set: what the base model already does, written down once, so a fine-tune can be measured
against it.

`psft_lite/data/retention/prompts.jsonl` holds 300 prompts written for this project, of seven kinds (facts, everyday
questions, instructions, short writing, code, simple reasoning, definitions); 80 of them have a checkable answer
(`answer` with `|`-separated alternatives, `match = "contains"`). This module asks the base model for its own greedy
answer to each, once, and writes them as a data set of prompt/completion rows:

    python -m psft_lite.study.benchmark --out data/retention/base.jsonl     # = make data-retention

Each row keeps the prompt's `id`, `kind`, `answer`/`match` (when checkable), and adds `completion` (the base's
answer, the reference a fine-tune's NLL and KL to the base are measured on), `base_correct` (checkable rows) and
`finished` (the answer ended with end-of-turn rather than the length limit).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from psft_lite.core.files import atomic_write_text

PROMPTS = Path(__file__).resolve().parent.parent / "data" / "retention" / "prompts.jsonl"


def read_prompts(path: Path = PROMPTS) -> list[dict[str, Any]]:
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]


def base_answers(
    model: str, prompts: list[dict[str, Any]], max_new_tokens: int = 160, batch_size: int = 16, dtype: str = "fp32"
) -> list[dict[str, Any]]:
    """The model's greedy answer to every prompt (fp32 by default, so the answers do not depend on the CPU's bf16)."""
    from psft_lite.inference.evaluate import EvalItem
    from psft_lite.inference.generate import generate, load_model

    loaded = load_model(model, dtype)
    chats = [[{"role": "user", "content": p["prompt"]}] for p in prompts]
    gens = generate(loaded, chats, max_new_tokens, batch_size=batch_size)
    rows = []
    for p, g in zip(prompts, gens):
        row = {**p, "completion": g.text, "finished": g.finished}
        if "answer" in p:
            row["base_correct"] = EvalItem([], "", p["answer"], p["id"], "contains").correct(g.text)[1]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=Path, default=PROMPTS)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()
    rows = base_answers(args.model, read_prompts(args.prompts), args.max_new_tokens, dtype=args.dtype)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    checked = [r for r in rows if "base_correct" in r]
    print(
        f"wrote {args.out}: {len(rows)} answers, {sum(r['finished'] for r in rows)} ended with end-of-turn; "
        f"{sum(r['base_correct'] for r in checked)} of {len(checked)} checkable answers right"
    )


if __name__ == "__main__":
    main()
