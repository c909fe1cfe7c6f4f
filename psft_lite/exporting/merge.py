"""`psft-lite merge`: fold an adapter into its base and prove the result computes what was trained.

The base is loaded the way it was trained (from the adapter's psft_lite.json or the run's recipe). A 4-bit base is
dequantized first — merging into 4-bit weights would round the LoRA delta away — then the adapter is merged and the
folder written (safetensors, config, generation config, tokenizer, chat template), loadable by plain transformers.

The check: the written folder is reloaded with plain transformers and its logits on a few sequences are compared
with the adapter model as trained (e.g. 4-bit base + adapter). In float32 they must agree to round-off. A half-precision
result cannot: it is required to be no further from the exact (float32) adapter model than the adapter model itself
is when run in that half precision — the error the dtype forces — and both figures are reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from psft_lite.core import rundir
from psft_lite.core.errors import RunError
from psft_lite.core.files import atomic_dir
from psft_lite.core.rundir import ADAPTER_META
from psft_lite.model import loading, runtime
from psft_lite.model.adapters import AdapterInfo, base_as_trained, resolve_adapter, run_conversations, with_adapter
from psft_lite.model.chat import FALLBACK_PROMPTS, stop_ids


def probe_batch(info: AdapterInfo, tokenizer: Any, n: int = 4, max_len: int = 128) -> dict[str, torch.Tensor]:
    """A few sequences to compare logits on: the run's own training examples when available."""
    texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in run_conversations(info.run_dir, n)]
    if not texts:
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in FALLBACK_PROMPTS[:n]
        ]
    enc = tokenizer(
        texts, add_special_tokens=False, padding=True, truncation=True, max_length=max_len, return_tensors="pt"
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.no_grad()
def _logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    dev = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)).logits
    return out.float().cpu()


def _compare(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    m = mask.bool()
    diff = (a - b).abs().amax(-1)[m]
    agree = (a.argmax(-1) == b.argmax(-1))[m].float().mean()
    return float(diff.max()), float(agree)


def _adapter_logits(
    info: AdapterInfo, device: torch.device, dtype: torch.dtype, batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Logits of base + adapter exactly as trained (4-bit base kept 4-bit), computed in `dtype`."""
    model = with_adapter(loading.load_base_model(info.base, device, dtype), info)
    logits = _logits(model, batch)
    del model
    return logits


def merged_model(
    info: AdapterInfo, device: torch.device, train_dtype: torch.dtype, out_dtype: torch.dtype, from_original: bool
) -> Any:
    base = base_as_trained(info, device, train_dtype, out_dtype, from_original)
    merged = with_adapter(base, info).merge_and_unload()
    merged.config.use_cache = True
    return merged


@dataclass
class References:
    """Logits of the adapter model on the probe batch: exact (float32), as trained, and in the output precision."""

    exact: torch.Tensor
    trained: torch.Tensor
    out: torch.Tensor


def reference_logits(
    info: AdapterInfo, device: torch.device, train_dtype: torch.dtype, out_dtype: torch.dtype, batch: dict
) -> References:
    exact = _adapter_logits(info, device, torch.float32, batch)
    trained = exact if train_dtype == torch.float32 else _adapter_logits(info, device, train_dtype, batch)
    out = {torch.float32: exact, train_dtype: trained}.get(out_dtype)
    return References(exact, trained, out if out is not None else _adapter_logits(info, device, out_dtype, batch))


def default_out(info: AdapterInfo) -> Path:
    """RUN_DIR/merged for a run's final adapter; `<adapter>-merged` beside any other adapter folder."""
    if info.run_dir is not None and info.path == rundir.adapter_dir(info.run_dir):
        return rundir.merged_dir(info.run_dir)
    return info.path.with_name(info.path.name + "-merged")


# The floor is one largest error over a few hundred positions x the vocabulary; the merged model's rounding is another
# draw of the same size, and its largest error came out 0.84x and 1.68x the floor on two bf16 runs (the quickstart;
# the README's 10-step Python example). A merge that loses the delta moves their logits by 15x and 19x the floor,
# so 2.5x keeps the check's teeth while a correct bf16 merge passes (`python bench/merge_margin.py RUN`).
FLOOR_MARGIN = 2.5


def check_merged(folder: Path, out_dtype: torch.dtype, device: torch.device, batch: dict, refs: References) -> dict:
    """Reload the written folder with plain transformers and compare its logits with the adapter model's. The
    tolerance: round-off, plus what the output precision alone costs (`dtype_noise_floor`, the adapter model's own
    largest error in that precision) times `FLOOR_MARGIN`."""
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(folder, dtype=out_dtype).to(device)
    got = _logits(saved, batch)
    del saved
    mask = batch["attention_mask"]
    d_trained, agree = _compare(got, refs.trained, mask)
    d_exact, _ = _compare(got, refs.exact, mask)
    floor = _compare(refs.out, refs.exact, mask)[0]
    return {
        "max_abs_dlogit": d_trained,
        "greedy_agreement": agree,
        "max_abs_dlogit_vs_fp32": d_exact,
        "tolerance": 1e-3 + 1e-4 * float(refs.exact.abs().max()) + FLOOR_MARGIN * floor,
        "dtype_noise_floor": floor,
        "positions": int(mask.sum()),
    }


def lost_tokenizer_keys(folder: Path, tokenizer: Any) -> list[str]:
    """Special tokens or the chat template that did not survive the save."""
    from transformers import AutoTokenizer

    tok2 = AutoTokenizer.from_pretrained(folder)
    return [k for k in ("eos_token", "pad_token", "chat_template") if getattr(tok2, k) != getattr(tokenizer, k)]


def merge(
    adapter: Path,
    out: Path | None = None,
    base: str | None = None,
    dtype: str | None = None,
    verify: bool = True,
    from_original: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """Merge and verify; returns the report. Nothing is left at `out` when the check fails."""
    from transformers import AutoTokenizer

    console = console or Console(stderr=True)
    runtime.quiet_transformers()
    info = resolve_adapter(adapter, base)
    device = runtime.resolve_device(info.base.device)
    train_dtype = info.train_dtype(device)
    out_dtype = runtime.DTYPES[dtype] if dtype else train_dtype
    out = Path(out) if out is not None else default_out(info)
    tokenizer = AutoTokenizer.from_pretrained(info.path)
    _announce(console, info, out, out_dtype, device, from_original)
    batch = probe_batch(info, tokenizer) if verify else None
    refs = reference_logits(info, device, train_dtype, out_dtype, batch) if verify else None
    merged = merged_model(info, device, train_dtype, out_dtype, from_original)
    gen = merged.generation_config
    stops = stop_ids(tokenizer, gen)
    gen.eos_token_id = stops[0] if len(stops) == 1 else stops
    gen.pad_token_id = tokenizer.pad_token_id
    report: dict[str, Any] = {"out": str(out), "adapter": str(info.path), "base": info.base.name}
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        del merged
        meta = {
            "merged_from": str(info.path),
            "base_model": info.base.model_dump(mode="json", exclude_none=True),
            "dtype": str(out_dtype).removeprefix("torch."),
            "from_original": from_original,
        }
        if verify:
            report.update(check_merged(tmp, out_dtype, device, batch, refs))
            _judge(report, lost_tokenizer_keys(tmp, tokenizer), info, out, from_original, console)
            meta["check"] = {k: report[k] for k in CHECK_KEYS}
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n")
    if verify:
        console.print(
            f"merge check on {report['positions']} positions: max |Δlogit| {report['max_abs_dlogit']:.4g} vs the "
            f"adapter model as trained, {report['max_abs_dlogit_vs_fp32']:.4g} vs its float32 computation (tolerance "
            f"{report['tolerance']:.4g}); greedy agreement {report['greedy_agreement']:.2%} — [green]ok[/green]"
        )
    return report


CHECK_KEYS = ("max_abs_dlogit", "greedy_agreement", "max_abs_dlogit_vs_fp32", "tolerance")


def _announce(
    console: Console, info: AdapterInfo, out: Path, out_dtype: torch.dtype, device: torch.device, from_original: bool
) -> None:
    if out_dtype == torch.float16 and device.type == "cpu":
        console.print(
            "note: fp16 output on CPU; the merge check computes fp16 logits on the CPU (slow for big models)."
        )
    exact = from_original or not info.base.load_in_4bit
    how = "original full-precision weights" if exact else "dequantized 4-bit weights"
    console.print(f"merging {info.path} into {info.base.name} ({how}), writing {str(out_dtype).removeprefix('torch.')}")
    if from_original and info.base.load_in_4bit:
        console.print(
            "[yellow]note:[/yellow] merging into the original weights, not the 4-bit ones the adapter was trained "
            "on: the result differs from the adapter model as trained."
        )


def _judge(
    report: dict[str, Any], lost: list[str], info: AdapterInfo, out: Path, from_original: bool, console: Console
) -> None:
    """Raise (nothing is written) when the merged model does not compute what was trained; merging a 4-bit adapter
    into the original weights is reported, not enforced (it cannot match)."""
    d_trained, agree, d_exact, allowed = (report[k] for k in CHECK_KEYS)
    if from_original and info.base.load_in_4bit:
        console.print(
            f"check (informational, not enforced): max |Δlogit| {d_trained:.4g}, greedy agreement {agree:.2%}"
        )
        return
    if d_exact <= allowed and not lost:
        return
    why = (
        f"lost {', '.join(lost)}"
        if lost
        else f"max |Δlogit| vs the float32 adapter model is {d_exact:.4g}, over the tolerance {allowed:.4g}"
    )
    raise RunError(
        f"merge check failed: {why} (greedy agreement {agree:.2%} on {report['positions']} positions). "
        f"Nothing was written to {out}. Use --no-verify to write it anyway."
    )


def write_merged(run_dir: Path, output: Any, console: Console) -> dict[str, Any]:
    """`output.save = ["merged"]`: the finished run's adapter merged into RUN_DIR/merged."""
    report = merge(rundir.adapter_dir(run_dir), out=rundir.merged_dir(run_dir), console=console)
    return {"merged": str(report["out"])}
