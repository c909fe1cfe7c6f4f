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

from psft_lite import modeling
from psft_lite.checkpoint import ADAPTER_META, atomic_dir, list_checkpoints, read_adapter_meta
from psft_lite.errors import ModelError, RunError
from psft_lite.recipe import ModelSection

FALLBACK_PROMPTS = [
    "What is the capital of France?",
    "Tom has 12 apples and buys 7 more. How many apples does he have?",
    "Write one sentence about the sea.",
    "List three prime numbers.",
]


@dataclass
class AdapterInfo:
    path: Path
    base: ModelSection
    dtype: str | None  # training dtype as resolved (bfloat16 / float32 / float16)
    run_dir: Path | None

    def train_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype the adapter was trained in: as recorded, else what the base section resolves to on `device`."""
        return getattr(torch, self.dtype) if self.dtype else modeling.resolve_dtype(self.base.dtype, device)


def resolve_adapter(path: Path, base_override: str | None = None) -> AdapterInfo:
    """A run dir, an adapter folder or a checkpoint folder → the adapter and how its base was loaded."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such run directory or adapter folder.")
    adapter = path / "adapter" if (path / "adapter" / "adapter_config.json").is_file() else path
    if not (adapter / "adapter_config.json").is_file() and list_checkpoints(path):
        adapter = list_checkpoints(path)[-1][1]  # a run stopped before its final adapter: its newest checkpoint
    if not (adapter / "adapter_config.json").is_file():
        raise ModelError(
            f"{path}: not an adapter (no adapter_config.json) and not a run directory with an adapter/ folder. Pass a "
            "run directory (e.g. runs/quickstart), its adapter/ or a checkpoints/step-N folder."
        )
    run_dir = next((p for p in (adapter.parent, adapter.parent.parent) if (p / "recipe.toml").is_file()), None)
    meta = read_adapter_meta(adapter)
    dtype = None
    if meta:
        base = ModelSection.model_validate(meta["base_model"])
        dtype = meta.get("dtype")
    elif (adapter / "recipe.toml").is_file() or run_dir is not None:
        from psft_lite.recipe import load_recipe

        base = load_recipe(
            adapter / "recipe.toml" if (adapter / "recipe.toml").is_file() else run_dir / "recipe.toml"
        ).model
    else:
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        name = cfg.get("base_model_name_or_path")
        if not name and not base_override:
            raise ModelError(f"{adapter}: the adapter does not say which base it was trained on; pass --base NAME.")
        base = ModelSection(name=name or base_override)
    if base_override:
        base = base.model_copy(update={"name": base_override})
    return AdapterInfo(adapter, base, dtype, run_dir)


def probe_batch(info: AdapterInfo, tokenizer: Any, n: int = 4, max_len: int = 128) -> dict[str, torch.Tensor]:
    """A few sequences to compare logits on: the run's own training examples when available."""
    texts: list[str] = []
    if info.run_dir is not None:
        try:
            from psft_lite.data import load_conversations
            from psft_lite.recipe import load_recipe

            recipe = load_recipe(info.run_dir / "recipe.toml")
            convs = load_conversations(recipe.data.train, recipe.data, limit=n)
            texts = [tokenizer.apply_chat_template(m, tokenize=False) for m, _ in convs]
        except Exception:  # the data may have moved since training; fall back to generic prompts
            texts = []
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


def with_adapter(base: Any, info: AdapterInfo) -> Any:
    """`base` wrapped with the trained adapter (plain PEFT), or a clear error when it was trained on another model."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, info.path)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ModelError(f"{info.path}: the adapter does not fit the base model {info.base.name!r}: {e}") from None


def _adapter_logits(
    info: AdapterInfo, device: torch.device, dtype: torch.dtype, batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Logits of base + adapter exactly as trained (4-bit base kept 4-bit), computed in `dtype`."""
    model = with_adapter(modeling.load_base_model(info.base, device, dtype), info)
    logits = _logits(model, batch)
    del model
    return logits


def base_as_trained(
    info: AdapterInfo, device: torch.device, train_dtype: torch.dtype, out_dtype: torch.dtype, from_original: bool
) -> Any:
    """The base weights the adapter applies to, in `out_dtype`: a 4-bit base loaded in 4-bit and dequantized (what
    training saw), or with `from_original` (and for any other base) the full-precision weights."""
    if info.base.load_in_4bit and not from_original:
        base = modeling.load_base_model(info.base, device, train_dtype).dequantize()
    else:
        base = modeling.load_base_model(info.base.model_copy(update={"load_in_4bit": False}), device, out_dtype)
    return base.to(out_dtype)


def merged_model(
    info: AdapterInfo, device: torch.device, train_dtype: torch.dtype, out_dtype: torch.dtype, from_original: bool
) -> Any:
    base = base_as_trained(info, device, train_dtype, out_dtype, from_original)
    merged = with_adapter(base, info).merge_and_unload()
    merged.config.use_cache = True
    return merged


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    console = console or Console(stderr=True)
    modeling.quiet_transformers()
    info = resolve_adapter(adapter, base)
    device = modeling.resolve_device(info.base.device)
    train_dtype = info.train_dtype(device)
    out_dtype = modeling.DTYPES[dtype] if dtype else train_dtype
    if out_dtype == torch.float16 and device.type == "cpu":
        console.print(
            "note: fp16 output on CPU; the merge check computes fp16 logits on the CPU (slow for big models)."
        )
    if out is None:
        out = (
            info.run_dir / "merged"
            if info.run_dir is not None and info.path.name == "adapter"
            else info.path.with_name(info.path.name + "-merged")
        )
    out = Path(out)
    tokenizer = AutoTokenizer.from_pretrained(info.path)
    batch = probe_batch(info, tokenizer) if verify else None
    how = (
        "original full-precision weights"
        if (from_original or not info.base.load_in_4bit)
        else "dequantized 4-bit weights"
    )
    console.print(f"merging {info.path} into {info.base.name} ({how}), writing {str(out_dtype).removeprefix('torch.')}")
    if from_original and info.base.load_in_4bit:
        console.print(
            "[yellow]note:[/yellow] merging into the original weights, not the 4-bit ones the adapter was trained "
            "on: the result differs from the adapter model as trained."
        )

    report: dict[str, Any] = {"out": str(out), "adapter": str(info.path), "base": info.base.name}
    ref_exact = ref_trained = ref_out = None
    if verify:  # the adapter model in float32, as trained, and in the output precision
        ref_exact = _adapter_logits(info, device, torch.float32, batch)
        ref_trained = ref_exact if train_dtype == torch.float32 else _adapter_logits(info, device, train_dtype, batch)
        ref_out = {torch.float32: ref_exact, train_dtype: ref_trained}.get(out_dtype)
        if ref_out is None:
            ref_out = _adapter_logits(info, device, out_dtype, batch)

    merged = merged_model(info, device, train_dtype, out_dtype, from_original)
    gen = merged.generation_config
    eos = tokenizer.eos_token_id
    if eos is not None:
        ids = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
        gen.eos_token_id = sorted({i for i in ids if i is not None} | {eos})
        gen.eos_token_id = gen.eos_token_id[0] if len(gen.eos_token_id) == 1 else gen.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
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
            saved = AutoModelForCausalLM.from_pretrained(tmp, dtype=out_dtype).to(device)
            got = _logits(saved, batch)
            del saved
            mask = batch["attention_mask"]
            d_trained, agree = _compare(got, ref_trained, mask)
            d_exact, _ = _compare(got, ref_exact, mask)
            tol = 1e-3 + 1e-4 * float(ref_exact.abs().max())
            floor = _compare(ref_out, ref_exact, mask)[0]  # what the output precision alone costs
            allowed = tol + 1.5 * floor
            report.update(
                max_abs_dlogit=d_trained,
                greedy_agreement=agree,
                max_abs_dlogit_vs_fp32=d_exact,
                tolerance=allowed,
                dtype_noise_floor=floor,
                positions=int(mask.sum()),
            )
            tok2 = AutoTokenizer.from_pretrained(tmp)
            lost = [k for k in ("eos_token", "pad_token", "chat_template") if getattr(tok2, k) != getattr(tokenizer, k)]
            if from_original and info.base.load_in_4bit:
                console.print(
                    f"check (informational, not enforced): max |Δlogit| {d_trained:.4g}, greedy agreement {agree:.2%}"
                )
            elif d_exact > allowed or lost:
                why = (
                    f"lost {', '.join(lost)}"
                    if lost
                    else (
                        f"max |Δlogit| vs the float32 adapter model is {d_exact:.4g}, over the tolerance {allowed:.4g}"
                    )
                )
                raise RunError(
                    f"merge check failed: {why} (greedy agreement {agree:.2%} on {int(mask.sum())} positions). "
                    f"Nothing was written to {out}. Use --no-verify to write it anyway."
                )
            meta["check"] = {
                k: report[k] for k in ("max_abs_dlogit", "greedy_agreement", "max_abs_dlogit_vs_fp32", "tolerance")
            }
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n")
    if verify:
        console.print(
            f"merge check on {report['positions']} positions: max |Δlogit| {report['max_abs_dlogit']:.4g} vs the "
            f"adapter model as trained, {report['max_abs_dlogit_vs_fp32']:.4g} vs its float32 computation (tolerance "
            f"{report['tolerance']:.4g}); greedy agreement {report['greedy_agreement']:.2%} — [green]ok[/green]"
        )
    return report
