"""How much room the merge check's low-precision tolerance leaves, on a trained run (the README's `psft-lite merge`).

    python bench/merge_margin.py runs/quickstart [--dtype bf16]

Prints, on the merge check's probe batch: the adapter model's own largest logit error in the output precision
against its float32 computation (the check's floor), the merged model's largest error (what the check judges), and
the largest error of a merge that lost the adapter's delta (the base model itself) — each also as a multiple of the
floor, beside the check's margin (`FLOOR_MARGIN`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a run folder or an adapter folder")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    args = ap.parse_args()
    import torch
    from rich.console import Console
    from transformers import AutoTokenizer

    from psft_lite.exporting import merge as m
    from psft_lite.model import loading

    quiet = Console(quiet=True)
    with tempfile.TemporaryDirectory() as tmp:
        report = m.merge(args.run, out=Path(tmp) / "merged", dtype=args.dtype, console=quiet)
    info = m.resolve_adapter(args.run, None)
    device = m.runtime.resolve_device(info.base.device)
    batch = m.probe_batch(info, AutoTokenizer.from_pretrained(info.path))
    exact = m.reference_logits(info, device, torch.float32, torch.float32, batch).exact
    base = m._logits(loading.load_base_model(info.base, device, torch.float32), batch)
    lost = m._compare(base, exact, batch["attention_mask"])[0]
    floor = report["dtype_noise_floor"]
    print(f"{args.run}, {args.dtype} output, {report['positions']} positions; the check's margin {m.FLOOR_MARGIN}x")
    print(f"floor (the adapter model in {args.dtype} vs float32): {floor:.4g}")
    merged = report["max_abs_dlogit_vs_fp32"]
    print(f"merged model vs float32:  {merged:.4g} ({merged / floor:.2f}x)")
    print(f"delta lost (the base):    {lost:.4g} ({lost / floor:.1f}x)")


if __name__ == "__main__":
    main()
