"""What `psft-lite export` costs and gives: export time and file size per quant type, and generation speed of the
exported model in llama.cpp against psft-lite's own `generate` (transformers) on the same prompts.

    python bench/export.py runs/quickstart                 # f16,q8_0,q4_0,q4_k_m,q5_k_m,q6_k
    python bench/export.py runs/quickstart --quants q8_0,q4_k_m --prompts 8

Each quant type is exported in its own `psft-lite export` call (merge and check included: the wall time a user
waits), then the check is skipped in a second call to time the conversion alone. Generation: greedy, the same chat
prompts from the run's training data, up to --max-new-tokens each; tokens/s = generated tokens / wall time, one
prompt at a time for both (llama.cpp with all cores, psft-lite with torch's default threads). Run it with nothing
else running on the machine, and report whether the CPU has avx512_bf16 (psft-lite generates in bf16 there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def export_once(run: Path, quant: str, out: Path, verify: bool) -> float:
    cmd = [sys.executable, "-m", "psft_lite", "export", str(run), "--quant", quant, "--out", str(out), "--overwrite"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd + ([] if verify else ["--no-verify"]), capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(p.stderr)
    return time.perf_counter() - t0


def prompts_from(run: Path, n: int) -> list[list[dict[str, str]]]:
    from psft_lite.data import load_conversations
    from psft_lite.recipe.schema import load_recipe

    recipe = load_recipe(run / "recipe.toml")
    convs = load_conversations(recipe.data.train, recipe.data, limit=n)
    return [[m for m in c if m["role"] != "assistant"] for c, _ in convs]


def llama_cpp_speed(path: Path, prompts: list[list[int]], max_new: int, eos: set[int]) -> tuple[int, float]:
    from psft_lite.exporting.gguf_check import open_llama

    tokens, t0 = 0, None
    with open_llama(path, n_ctx=1024) as llm:
        t0 = time.perf_counter()
        for ids in prompts:
            for n, tok in enumerate(llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True), 1):
                if tok in eos or n >= max_new:
                    break
            tokens += n
        return tokens, time.perf_counter() - t0


def psft_speed(run: Path, prompts: list[list[dict[str, str]]], max_new: int) -> tuple[int, float, str]:
    from psft_lite.inference.generate import generate, load_model

    loaded = load_model(run)
    generate(loaded, prompts[:1], max_new_tokens=4, batch_size=1)  # warm-up
    t0 = time.perf_counter()
    outs = generate(loaded, prompts, max_new_tokens=max_new, batch_size=1)
    return sum(o.n_tokens for o in outs), time.perf_counter() - t0, str(loaded.dtype).removeprefix("torch.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--quants", default="f16,q8_0,q4_0,q4_k_m,q5_k_m,q6_k")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    a = ap.parse_args()
    from psft_lite.exporting.gguf import resolve
    from psft_lite.model import runtime
    from psft_lite.model.chat import end_of_turn_id

    print(f"CPU: {os.cpu_count()} cores, avx512_bf16 {'yes' if runtime.cpu_has_bf16() else 'no'}")
    src = resolve(a.run)
    tok = src.tokenizer
    msgs = prompts_from(a.run, a.prompts)
    ids = [tok(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True))["input_ids"] for m in msgs]
    eos = {end_of_turn_id(tok), tok.eos_token_id}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for q in a.quants.split(","):
            out = Path(tmp) / f"m-{q}.gguf"
            checked = export_once(a.run, q, out, verify=True)
            plain = export_once(a.run, q, out, verify=False)
            n, s = llama_cpp_speed(out, ids, a.max_new_tokens, eos)
            rows.append(
                {
                    "quant": q,
                    "mb": out.stat().st_size / 1e6,
                    "export_s": plain,
                    "checked_s": checked,
                    "tok_s": n / s,
                    "tokens": n,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    n, s, dtype = psft_speed(a.run, msgs, a.max_new_tokens)
    print()
    print("| type | file | export (s) | export + check (s) | llama.cpp greedy tokens/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['quant']} | {r['mb']:.0f} MB | {r['export_s']:.0f} | {r['checked_s']:.0f} | {r['tok_s']:.0f} |")
    print(f"\npsft-lite generate (transformers, {dtype}, adapter applied): {n / s:.0f} tokens/s ({n} tokens)")


if __name__ == "__main__":
    main()
