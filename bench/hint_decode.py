"""Hinted Decoding speed: incremental two-stream decoding (KV caches) vs recomputing the full prefix every step.

    python bench/hint_decode.py [--new-tokens 256]

Embedded SmolLM2-135M-Instruct, one arithmetic problem, a fixed hint prefix, β = 3, temperature 0.3, top-p 0.95;
end-of-turn is ignored so both paths decode exactly --new-tokens tokens. Prints tokens/s for both and the speed-up.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--dtype", default=None)
    args = ap.parse_args()

    from psft_lite.inference import hinted
    from psft_lite.inference.generate import load_model

    loaded = load_model("smollm2-135m-instruct", args.dtype)
    hinted.eos_ids = lambda loaded: []  # decode the full length on both paths
    q = [
        {
            "role": "user",
            "content": "Tom has 12 apples. He buys 7 more and gives 5 to Anna. How many apples does he have?",
        }
    ]
    ref = "After buying, Tom has 12 + 7 = 19 apples. After giving 5 away he has 19 - 5 = 14.\n#### 14"
    prefix = "# Analyze\nThe solution adds the apples bought, then subtracts the ones given away.\n\n# CoT\n"
    p_ids = hinted.prompt_ids(loaded, hinted.analysis_messages(q, ref), prefix)
    q_ids = hinted.prompt_ids(loaded, q)
    cfg = hinted.HintConfig(max_new_tokens=args.new_tokens, answer_marker="", repeat_count=10**9)
    hinted.decode(loaded, p_ids, q_ids, hinted.HintConfig(max_new_tokens=8, answer_marker=""), seed=0)  # warm-up
    rates = {}
    for name, incremental in (("incremental (KV cache)", True), ("recompute full prefix", False)):
        t0 = time.perf_counter()
        d = hinted.decode(loaded, p_ids, q_ids, cfg, seed=0, incremental=incremental)
        dt = time.perf_counter() - t0
        rates[name] = len(d.tokens) / dt
        print(f"{name:<24} {len(d.tokens)} tokens in {dt:6.1f} s = {rates[name]:6.1f} tokens/s", flush=True)
    a, b = rates.values()
    print(
        f"speed-up {a / b:.1f}× at {args.new_tokens} new tokens (prompts {len(p_ids)} + {len(q_ids)} tokens, "
        f"{str(loaded.dtype).removeprefix('torch.')} on {loaded.device.type})"
    )


if __name__ == "__main__":
    main()
