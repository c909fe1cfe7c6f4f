"""A batch through the model: the decoder, then the LM head over the trained positions only (model.logprobs) —
per-token log-probs, entropy, the KL to the base (sft_kl, asft), the base's own hidden states — and the switch that
turns the adapter off to get the base model exactly."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from psft_lite.core.errors import ModelError
from psft_lite.model.logprobs import Reference, head_outputs, reference_topk, target_logprobs

# ---------------------------------------------------------------------------------------------------------------------
# Forward: hidden states → per-token log-probs of the trained targets


def causal_lm(model: Any) -> Any:
    """The transformers *ForCausalLM inside a PeftModel (or the model itself)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


@dataclass
class Head:
    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None
    scale: float


def lm_head(model: Any) -> Head:
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) and not hasattr(head, "weight"):
        raise ModelError(f"{type(lm).__name__}: unsupported output layer {type(head).__name__}.")
    cfg = lm.config
    return Head(
        weight=head.weight,
        bias=getattr(head, "bias", None),
        softcap=getattr(cfg, "final_logit_softcapping", None),
        scale=float(getattr(cfg, "logit_scale", None) or 1.0),
    )


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for half-precision runs (LoRA weights stay float32); a no-op for fp32."""
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def response_logprobs(model: Any, batch: Any, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(target) [B, L] (with grad when enabled) and entropy [B, L] at the batch's trained tokens.

    Position t of the outputs scores token t of `input_ids` (predicted from position t−1); zero elsewhere.
    """
    hidden = causal_lm(model).get_decoder()(**batch.model_inputs(), use_cache=False).last_hidden_state  # [B, L, H]
    head = lm_head(model)
    # shift: hidden at t-1 predicts token t
    mask = batch.target_mask[:, 1:]
    logp, ent = target_logprobs(
        hidden[:, :-1], head.weight, batch.input_ids[:, 1:], mask, head.bias, chunk, head.softcap, head.scale
    )
    pad = logp.new_zeros(logp.shape[0], 1)
    return torch.cat([pad, logp], 1), torch.cat([pad, ent], 1)


def response_outputs(
    model: Any,
    batch: Any,
    kl: str | None = None,
    topk: int = 0,
    chunk: int = 1024,
    ref: Reference | None = None,
) -> dict[str, torch.Tensor]:
    """The fused head's outputs at the batch's trained tokens, each [B, L] (position t scores token t, zero
    elsewhere): `logp` (with grad when enabled), `entropy`, and when asked `kl` — KL between the model and the base
    (the adapter disabled), `kl` = "reverse" for KL(p_θ ‖ p_base), "forward" for KL(p_base ‖ p_θ), with gradient —
    and `topk_entropy` (the entropy of the `topk` largest logits, over ln k). The base's distribution comes from
    `ref` when given (a cache; `base_reference`), else from one forward with the adapter off and no gradient."""
    hidden = causal_lm(model).get_decoder()(**batch.model_inputs(), use_cache=False).last_hidden_state
    if kl and ref is None:
        ref = base_reference(model, batch)
    head = lm_head(model)
    out = head_outputs(
        hidden[:, :-1],
        head.weight,
        batch.input_ids[:, 1:],
        batch.target_mask[:, 1:],
        head.bias,
        ref if kl else None,
        kl,
        topk,
        chunk,
        head.softcap,
        head.scale,
    )
    pad = hidden.new_zeros(hidden.shape[0], 1, dtype=torch.float32)
    return {k: torch.cat([pad, v], 1) for k, v in out.items()}


@torch.no_grad()
def base_reference(model: Any, batch: Any, top_k: int = 0, chunk: int = 1024) -> Reference:
    """The base model's distribution (the adapter disabled, no gradient) at the positions that predict the batch's
    trained tokens, in row-major order: its final hidden states, or with `top_k` its k most likely tokens (the trained
    token always among them) and the mass of the rest (`logprobs.reference_topk`)."""
    with adapter_disabled(model):
        states = response_hidden(model, batch)
    if not top_k:
        return Reference(hidden=states)
    head = lm_head(model)
    targets = batch.input_ids[:, 1:][batch.target_mask[:, 1:]]
    return reference_topk(states, head.weight, top_k, head.bias, chunk, head.softcap, head.scale, targets)


def response_hidden(model: Any, batch: Any) -> torch.Tensor:
    """Final hidden states [N, H] at the positions that predict the batch's N trained tokens (row-major order)."""
    hidden = causal_lm(model).get_decoder()(**batch.model_inputs(), use_cache=False).last_hidden_state
    return hidden[:, :-1][batch.target_mask[:, 1:]]


def example_batches(examples: list, pad_id: int, device: torch.device, batch_size: int = 8) -> Iterator[Any]:
    """Tokenized examples in order as padded batches on `device` (for no-grad scoring)."""
    from psft_lite.data.batching import collate

    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        yield collate(chunk, list(range(start, start + len(chunk))), pad_id).to(device)


@torch.no_grad()
def score_examples(
    model: Any, examples: list, pad_id: int, device: torch.device, dtype: torch.dtype, batch_size: int = 8
) -> Iterator[tuple[Any, torch.Tensor, torch.Tensor]]:
    """(batch, logp, entropy) for examples in order, batched, without gradients (eval, ddt)."""
    for b in example_batches(examples, pad_id, device, batch_size):
        with autocast(device, dtype):
            logp, ent = response_logprobs(model, b)
        yield b, logp, ent


def forward_takes(model: Any, name: str) -> bool:
    """Whether the (peft-wrapped) model's own forward has a parameter `name`."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in inspect.signature(type(base).forward).parameters


def cache_kwarg(model: Any) -> str:
    """The forward's name for the KV cache: `cache` from transformers 5.25 on (`past_key_values` is deprecated there),
    `past_key_values` before."""
    return "cache" if forward_takes(model, "cache") else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@contextlib.contextmanager
def adapter_disabled(model: Any) -> Iterator[None]:
    """The base model's exact outputs (LoRA and QLoRA, tested): every adapter layer's forward skips its adapter —
    the switch peft's `disable_adapter()` flips, without also clearing the adapter's requires_grad as peft does:
    FSDP fixes a weight's requires_grad when it first gathers it, so a first forward without the adapter (psft's base
    log-probs) would freeze a sharded run's adapter for good."""
    switches = [m for m in model.modules() if hasattr(m, "_disable_adapters")]
    before = [m._disable_adapters for m in switches]
    for m in switches:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, b in zip(switches, before):
            m._disable_adapters = b


def trainable_parameters(model: Any) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
