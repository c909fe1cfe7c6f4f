"""Greedy decoding speed: psft-lite's decoder, which drops each row from the batch once it ends its turn, against
transformers' generate, which computes every row until the last one ends — on an evaluation set, as `eval` runs it.

    python bench/greedy_decode.py [MODEL_OR_RUN] [--data data/arith/format_test.jsonl] [--n 200] [--batch 32]

Both paths decode the same batches (greedy, --max-new-tokens, the chat template's end-of-turn); the script prints
each path's wall time, the generated and the computed token counts, and how many answers are identical. Run it on a
trained run (its answers end early and unevenly) and on a base model (its answers run long).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    ap.add_argument("--data", default=str(ROOT / "data" / "arith" / "format_test.jsonl"))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default=None)
    args = ap.parse_args()

    from psft_lite.inference import generate as gen

    loaded = gen.load_model(args.model, args.dtype)
    rows = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines()[: args.n]]
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    gen.generate(loaded, prompts[:2], 8)  # warm-up, outside the timings
    results = {}
    for name, plain in (("psft-lite greedy (drops finished rows)", True), ("transformers generate", False)):
        gen.plain_greedy = lambda model, plain=plain: plain  # noqa: E731 -- choose the path
        t0 = time.perf_counter()
        out = gen.generate(loaded, prompts, args.max_new_tokens, batch_size=args.batch)
        results[name] = (time.perf_counter() - t0, out)
    (a_name, (a_t, a)), (b_name, (b_t, b)) = results.items()
    lengths = [g.n_tokens for g in a]
    computed = sum(
        max(lengths[i : i + args.batch]) * len(lengths[i : i + args.batch]) for i in range(0, len(a), args.batch)
    )
    same = sum(x.text == y.text and x.n_tokens == y.n_tokens for x, y in zip(a, b))
    print(f"{args.model} on {len(prompts)} prompts of {args.data}, batch {args.batch}, {loaded.dtype}")
    print(
        f"  generated tokens {sum(lengths):,}; transformers computes {computed:,} row-steps (every row until the last)"
    )
    print(f"  {a_name}: {a_t:.1f} s")
    print(f"  {b_name}: {b_t:.1f} s  ({b_t / a_t:.2f}x the time)")
    print(f"  identical answers: {same} of {len(a)}")


if __name__ == "__main__":
    main()
