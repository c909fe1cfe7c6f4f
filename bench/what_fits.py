"""What fits where: psft-lite's preflight memory estimate for the models users name most, on 8–24 GB cards.

    python bench/what_fits.py                  # the README table (markdown)
    python bench/what_fits.py --json fits.json
    python bench/what_fits.py --sharded        # per-GPU estimates of sharded (FSDP) runs of 32B and 70B models

No hub access is needed: each model's published config.json figures (hidden size, layers, heads, vocabulary, tied
embeddings) are written into a local folder, and `preflight.estimate_memory` — the same function `psft-lite
validate` uses — counts parameters on the meta device and estimates peak GPU memory for LoRA r 16 all-linear, bf16
compute, AdamW, one micro-batch of the given length whose response is half of it. Estimates, not measurements.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# name: (transformers config class, its published figures)
MODELS = {
    "Qwen2.5-0.5B": ("Qwen2Config", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                         tie_word_embeddings=True)),
    "Qwen2.5-1.5B": ("Qwen2Config", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                         tie_word_embeddings=True)),
    "Qwen2.5-3B": ("Qwen2Config", dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                       num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                                       tie_word_embeddings=True)),
    "Qwen2.5-7B": ("Qwen2Config", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                       tie_word_embeddings=False)),
    "Llama-3.2-1B": ("LlamaConfig", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                         tie_word_embeddings=True, head_dim=64)),
    "Llama-3.2-3B": ("LlamaConfig", dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                         num_attention_heads=24, num_key_value_heads=8, vocab_size=128256,
                                         tie_word_embeddings=True, head_dim=128)),
    "Llama-3.1-8B": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                         tie_word_embeddings=False)),
    "Mistral-7B-v0.3": ("MistralConfig", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                              num_attention_heads=32, num_key_value_heads=8, vocab_size=32768,
                                              tie_word_embeddings=False)),
}  # fmt: skip
BIG = {
    "Qwen2.5-32B": ("Qwen2Config", dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                                        num_attention_heads=40, num_key_value_heads=8, vocab_size=152064,
                                        tie_word_embeddings=False)),
    "Llama-3.1-70B": ("LlamaConfig", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                          num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                                          tie_word_embeddings=False)),
}  # fmt: skip
CARDS = (8, 12, 16, 24)
LENGTHS = (512, 1024, 2048)
MICRO = (1, 2, 4)


def estimate(
    folder: Path, four_bit: bool, length: int, micro: int, gc: bool, objective: dict, shards: int = 1
) -> tuple[float, int]:
    """(estimated peak GB on a GPU — on each GPU of a sharded run over `shards` —, parameter count)."""
    import torch

    from psft_lite.model import loading
    from psft_lite.recipe.schema import recipe_from_dict
    from psft_lite.training.preflight import GB, count_parameters, estimate_memory

    recipe = recipe_from_dict(
        {
            "model": {"name": str(folder), "load_in_4bit": four_bit, "gradient_checkpointing": gc, "dtype": "bf16"},
            "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
            "data": {"train": "unused.jsonl", "max_length": length},
            "objective": objective,
            "train": {"batch_size": micro * 4, "micro_batch_size": micro},
        }
    )
    src = loading.ModelSource(str(folder), None, folder.name)
    est = estimate_memory(recipe, src, torch.device("cuda"), torch.bfloat16, length, length // 2, shards=shards)
    return est.total / GB, count_parameters(recipe, src)[0]


def sharded_table() -> None:
    """Per-GPU GB of 32B/70B models: one GPU with a 4-bit base (QLoRA), and a bf16 base sharded over 2, 4, 8 GPUs
    (4-bit weights cannot be sharded), LoRA r 16, gradient checkpointing on, micro-batch 1 of 1024 tokens, sft."""
    import transformers

    counts = (2, 4, 8)
    print("| model | params | 1 GPU, 4-bit | " + " | ".join(f"{n} GPUs, bf16 sharded (each)" for n in counts) + " |")
    print("|---|---|---|" + "---|" * len(counts))
    with tempfile.TemporaryDirectory(prefix="psft-what-fits-") as tmp:
        for name, (cls, figures) in BIG.items():
            folder = Path(tmp) / name
            getattr(transformers, cls)(**figures).save_pretrained(folder)
            q, n_params = estimate(folder, True, 1024, 1, True, {"kind": "sft"})
            cells = [estimate(folder, False, 1024, 1, True, {"kind": "sft"}, shards=n)[0] for n in counts]
            mark = lambda gb: f"{gb:.1f}" + (" (fits 24 GB)" if gb <= 24 else "")  # noqa: E731
            print(f"| {name} | {n_params / 1e9:.1f} B | {mark(q)} | " + " | ".join(mark(c) for c in cells) + " |")


def main() -> None:
    import transformers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--sharded", action="store_true", help="the sharded (FSDP) table for 32B and 70B models")
    args = ap.parse_args()
    if args.sharded:
        return sharded_table()
    objectives = {
        "sft": {"kind": "sft"},
        "psft-snapshot": {"kind": "psft", "old_policy": "snapshot"},
        "psft-base": {"kind": "psft", "old_policy": "base"},
    }
    rows, out = [], []
    with tempfile.TemporaryDirectory(prefix="psft-what-fits-") as tmp:
        for name, (cls, figures) in MODELS.items():
            folder = Path(tmp) / name
            getattr(transformers, cls)(**figures).save_pretrained(folder)
            for four_bit in (True, False):
                for gc in (False, True):
                    cells = {}
                    for length in LENGTHS:
                        for micro in MICRO:
                            per_obj = {
                                k: estimate(folder, four_bit, length, micro, gc, o) for k, o in objectives.items()
                            }
                            gb, n_params = per_obj["sft"]
                            cells[(length, micro)] = gb
                            out.append(
                                {
                                    "model": name,
                                    "params_b": n_params / 1e9,
                                    "4bit": four_bit,
                                    "gradient_checkpointing": gc,
                                    "length": length,
                                    "micro_batch": micro,
                                    **{f"{k}_gb": v[0] for k, v in per_obj.items()},
                                }
                            )
                    rows.append((name, n_params, four_bit, gc, cells))
    print("| model | params | base | ckpt | " + " | ".join(f"{n}×{m}" for n in LENGTHS for m in MICRO) + " |")
    print("|---|---|---|---|" + "---|" * (len(LENGTHS) * len(MICRO)))
    for name, n_params, four_bit, gc, cells in rows:
        marks = []
        for key in [(n, m) for n in LENGTHS for m in MICRO]:
            gb = cells[key]
            card = next((c for c in CARDS if gb <= c), None)
            marks.append(f"{gb:.1f}" + (f" ({card})" if card else " (—)"))
        print(f"| {name} | {n_params / 1e9:.2f} B | {'4-bit' if four_bit else 'bf16'} | {'on' if gc else 'off'} | "
              + " | ".join(marks) + " |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
