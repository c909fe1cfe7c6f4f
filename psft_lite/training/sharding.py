"""Sharded training (`train.strategy = "fsdp"`): the base's decoder layers split across processes with PyTorch's FSDP2
(`fully_shard`), so a model no single device can hold still trains; LoRA weights train sharded alongside.

What changes against one process, and what does not:
- Each decoder layer is one FSDP unit (gathered for its forward and backward, freed after); frozen and trainable
  weights shard alike. The embeddings, final norm and LM head stay whole on every process: they are frozen (no
  gradient to sync), and psft-lite's chunked LM head reads the head's weight directly, outside any module's forward.
- FSDP averages gradients over processes. psft-lite's losses are already weighted by the whole step's trained-token
  count (objectives.token_weights), so the exact global gradient is the *sum*: `Dist.all_reduce_grads` multiplies by
  the number of processes instead of all-reducing (gloo has no pre-scaled sum).
- Mixed precision is the one-process kind: every weight keeps the dtype it was loaded in (a bf16 base, float32 LoRA
  weights; FSDP gathers each in its own dtype and reduces the LoRA gradients in float32) and autocast casts for the
  compute, so a sharded step computes what one process computes. (FSDP's own MixedPrecisionPolicy would cast the
  LoRA weights to bf16 before autocast sees them: measured, it drifts from the one-process trajectory.)
- Checkpoints and the final adapter are gathered to full tensors and written by rank 0 in the one-process layout
  (a plain PEFT adapter; optimizer state keyed as a one-process AdamW's), so resume, merge, export and eval read an
  FSDP run as any other, and a run may resume under another strategy or process count.
"""

from __future__ import annotations

from typing import Any

import torch

from psft_lite.core.errors import RecipeError
from psft_lite.model import scoring


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The repeated decoder blocks of a (PEFT-wrapped) causal LM: the units FSDP shards one at a time."""
    decoder = scoring.causal_lm(model).get_decoder()
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    if layers is None:
        raise RecipeError(
            f'train.strategy = "fsdp": cannot find the decoder layers of {type(decoder).__name__} to shard; '
            'use train.strategy = "ddp" for this model.'
        )
    return list(layers)


def check_supported(load_in_4bit: bool) -> None:
    """bitsandbytes' 4-bit weights are tensor subclasses whose quantisation state FSDP2 cannot split."""
    if load_in_4bit:
        raise RecipeError(
            'train.strategy = "fsdp" with model.load_in_4bit = true: bitsandbytes\' 4-bit weights cannot be sharded '
            "by FSDP2 in this version of psft-lite. Shard the model in bf16 (model.load_in_4bit = false), or train "
            'the 4-bit model with train.strategy = "ddp" (every process holds the whole quantized model).'
        )


def shard(model: Any) -> None:
    """FSDP2 on every decoder layer (the embeddings, final norm and head stay whole: see the module's docstring)."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)


def is_sharded(model: Any) -> bool:
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def full(t: Any) -> torch.Tensor:
    """A full tensor on the CPU from a shard (a collective: every process must call it) or a plain tensor."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()


def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """Every trainable (LoRA) weight gathered whole, by parameter name; every process calls it, all get the result."""
    return {n: full(p) for n, p in model.named_parameters() if p.requires_grad}


def optimizer_state(model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state gathered whole, in the layout of a one-process optimizer over the same trainable
    parameters (integer keys in parameter order), so a checkpoint does not depend on how the run was sharded."""
    sd = optimizer.state_dict()
    return {
        "state": {i: {k: full(v) if torch.is_tensor(v) else v for k, v in st.items()} for i, st in sd["state"].items()},
        "param_groups": sd["param_groups"],
    }


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """A one-process optimizer state into a sharded optimizer: each tensor cut to this process's shard."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    local = {}
    for i, st in state["state"].items():
        p = params[int(i)]
        local[int(i)] = {k: _like(v, p) if torch.is_tensor(v) and v.shape == p.shape else v for k, v in st.items()}
    optimizer.load_state_dict({"state": local, "param_groups": state["param_groups"]})


def load_adapter_state(model: Any, weights: dict[str, torch.Tensor]) -> list[str]:
    """Adapter weights (PEFT file names: no adapter name) into a sharded model; returns the names not found."""
    params = dict(model.named_parameters())
    missing = []
    for name, value in weights.items():
        target = next((params[n] for n in _candidates(name) if n in params), None)
        if target is None:
            missing.append(name)
            continue
        with torch.no_grad():
            target.copy_(_like(value, target))
    return missing


def _candidates(file_key: str) -> list[str]:
    """PEFT saves `...lora_A.weight` for the parameter `...lora_A.default.weight`."""
    head, _, last = file_key.rpartition(".")
    return [file_key, f"{head}.default.{last}"]


def _like(value: torch.Tensor, param: Any) -> torch.Tensor:
    """`value` (a full tensor) as `param` holds it: the same shard of the same mesh, or plain."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)
    return value.to(device=param.device, dtype=param.dtype)
