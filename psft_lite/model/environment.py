"""`psft-lite env`: the facts that decide a bug report, as a markdown block to paste into it.

Versions of psft-lite and the libraries it drives, the OS, the CPU (and whether it computes bf16), every GPU (name,
memory, compute capability, bf16), whether 4-bit NF4 works here (a seconds-long self-test through bitsandbytes), and
where models and data come from (PSFT_LITE_HOME, the Hugging Face cache, offline flags). Never fails: what is
missing is said. Token values are never printed, only whether one is set.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "safetensors", "gguf")
#: the extras: trackers (output.report_to), lm-evaluation-harness (eval --tasks), llama.cpp (export)
OPTIONAL = ("tensorboard", "wandb", "mlflow", "trackio", "lm_eval", "llama_cpp_python")
ENV_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "CUDA_VISIBLE_DEVICES")


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpus() -> list[dict[str, Any]]:
    import torch

    out = []
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        p = torch.cuda.get_device_properties(i)
        out.append(
            {
                "name": p.name,
                "memory_gb": p.total_memory / 2**30,
                "capability": f"{p.major}.{p.minor}",
                "bf16": p.major >= 8,  # Ampere and newer compute bf16 natively
            }
        )
    return out


def four_bit_self_test(device: str) -> str:
    """Quantize a small matrix to NF4, multiply through it and back-propagate, on `device`: 'works' or why not."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "kernels package missing": harmless
    try:
        import bitsandbytes as bnb
        import torch
        from bitsandbytes import functional as F
    except Exception as e:  # any import failure is the answer, not a crash
        return f"fails: cannot import bitsandbytes ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(64, 64, generator=gen).to(device)
        q, state = F.quantize_4bit(w, quant_type="nf4")
        back = F.dequantize_4bit(q, state)
        x = torch.randn(4, 64, generator=gen).to(device).requires_grad_(True)
        y = bnb.matmul_4bit(x, q.t(), quant_state=state)
        y.sum().backward()
        err = float((back - w).abs().max() / w.abs().max())
        match = float((y.detach() - x.detach() @ back.t()).abs().max())
        if err > 0.2 or match > 1e-2 or x.grad is None or float(x.grad.abs().sum()) == 0:
            return f"fails: NF4 round trip error {err:.3f} of max |w|, matmul mismatch {match:.3g}"
        return f"works (NF4 round trip error {err:.3f} of max |w|; matmul and its gradient agree)"
    except Exception as e:
        return f"fails: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def collect() -> dict[str, Any]:
    import torch

    from psft_lite import __version__
    from psft_lite.model import runtime

    try:
        from huggingface_hub import constants

        hf_cache = constants.HF_HUB_CACHE
    except ImportError:
        hf_cache = "huggingface_hub not installed"
    build = (
        f"CUDA {torch.version.cuda}"
        if torch.version.cuda
        else ("ROCm " + torch.version.hip if torch.version.hip else "CPU")
    )
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "psft-lite": __version__,
        "python": platform.python_version(),
        "torch_build": build,
        "versions": {p: version(p) for p in PACKAGES},
        "optional": {p: version(p) for p in OPTIONAL},
        "os": platform.platform(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "cpu_bf16": runtime.cpu_has_bf16(),
        "gpus": gpus(),
        "four_bit": {d: four_bit_self_test(d) for d in devices},
        "psft_lite_home": str(runtime.home()),
        "hf_cache": str(hf_cache),
        "flags": {k: os.environ.get(k, "unset") for k in ENV_FLAGS},
        "hf_token": "set" if (os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")) else "unset",
    }


def markdown(info: dict[str, Any]) -> str:
    v = info["versions"]
    lines = [
        "### psft-lite environment",
        "",
        f"- psft-lite: {info['psft-lite']}",
        f"- Python: {info['python']}",
        f"- torch: {v['torch']} ({info['torch_build']} build)",
        *[f"- {p}: {v[p]}" for p in PACKAGES if p != "torch"],
        "- extras: " + ", ".join(f"{p} {info['optional'][p]}" for p in OPTIONAL),
        f"- OS: {info['os']}",
        f"- CPU: {info['cpu']}, {info['cores']} cores, bf16 {'yes' if info['cpu_bf16'] else 'no (fp32 on CPU)'}",
    ]
    if info["gpus"]:
        for i, g in enumerate(info["gpus"]):
            lines.append(
                f"- GPU {i}: {g['name']}, {g['memory_gb']:.1f} GB, compute capability {g['capability']}, "
                f"bf16 {'yes' if g['bf16'] else 'no (fp16)'}"
            )
    else:
        lines.append("- GPU: none visible to torch")
    lines += [f"- 4-bit NF4 on {d}: {r}" for d, r in info["four_bit"].items()]
    lines += [
        f"- PSFT_LITE_HOME: {info['psft_lite_home']}",
        f"- Hugging Face cache: {info['hf_cache']}",
        "- " + ", ".join(f"{k}={val}" for k, val in info["flags"].items()),
        f"- HF_TOKEN: {info['hf_token']}",
    ]
    return "\n".join(lines)
