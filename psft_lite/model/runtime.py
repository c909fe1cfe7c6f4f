"""What psft-lite sets up in a process before models load: its cache folder, the offline switch, how quiet the
libraries are, and which device and precision a run uses."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from psft_lite.core.errors import ModelError

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
