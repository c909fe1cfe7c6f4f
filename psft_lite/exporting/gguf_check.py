"""The export's proof, run in llama.cpp itself (llama-cpp-python): the written GGUF must tokenize like the
tokenizer the run trained with, compute the merged model's next-token logits within a tolerance set per quant type,
and end greedy answers with the end-of-turn token.

Tolerances (max |Δlogit| against the float32 transformers model, and top-1 agreement) were measured on the
embedded SmolLM2-135M, base and fine-tuned (figures in the README's GGUF section), and set at two to five times the
worst max |Δ| seen and 5-25 points under the worst top-1 agreement, so that a wrong tensor layout, a wrong norm
epsilon or a lost tokenizer field — each of which moves logits by tens of nats and top-1 agreement far below these
floors (a q/k permutation left out: 38 % top-1) — fails, while quantization noise passes.

End of turn: greedy answers run only on prompts whose answer the merged transformers model itself ends, with a budget
of 4 × its answer length + 64 tokens. Float types must end all of them; a quantized type may word an answer
differently (a 135M model at 8 bits already does) but must end at least one, since a broken end-of-turn setup ends none.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from psft_lite.core.errors import ModelError
from psft_lite.core.extras import require_extra
from psft_lite.exporting import gguf_header

# max |Δlogit|, min top-1 agreement (see the module docstring; worst seen in brackets, base and fine-tuned
# SmolLM2-135M, 190-376 positions). Float types: round-off (top-1 floors leave room for near-ties). Quant types: a
# 135M model with 576-wide rows is a hard case (K-quants fall back to other block types on rows not divisible by 256).
TOLERANCE = {
    "f32": (0.25, 0.97),  # [0.050, 99.7%]
    "f16": (0.5, 0.97),  # [0.089, 99.7%]
    "bf16": (1.0, 0.95),  # [0.351, 100%]
    "q8_0": (6.0, 0.85),  # [3.02, 95.2%]
    "q6_k": (12.0, 0.75),  # [5.98, 87.9%]
    "q5_k_m": (26.0, 0.7),  # [13.0, 83.2%]
    "q4_k_m": (24.0, 0.7),  # [10.6, 88.3%]
    "q4_0": (30.0, 0.5),  # [22.8, 63.7%]
    "lora": (6.0, 0.85),  # the adapter GGUF on its base GGUF: the base's quantization noise
}

FLOAT_TYPES = ("f32", "f16", "bf16")

AWKWARD_STRINGS = [
    "Hello, world!",
    "naïve café — Ünïcödé ✓ 日本語のテキスト 🦙🚀",
    "12345 + 67890 = 80235; 3.14159, 1e-9, 007",
    "tabs\tand\t\tspaces    and\n\n\nnewlines \r\n end  ",
    "  leading and trailing spaces  ",
    "<|im_start|>user\nspecial tokens written as text<|im_end|>",
    "don't won't I'll we've they're IT'S",
    "def f(x):\n    return x ** 2  # code\n",
    "",
]


def check_output(where: str) -> None:
    """`output.save = ["gguf"]` fails before training, not after it, when llama.cpp's binding is missing."""
    require(f"{where}: output.save = 'gguf' (the export's check in llama.cpp)")


def require(what: str) -> None:
    """llama.cpp's Python binding, or one paragraph saying how to install it (it builds from source where no wheel
    exists: ~5 min on 2 cores, cached afterwards)."""
    require_extra("llama_cpp", f"{what} needs llama.cpp's Python binding", error=ModelError)


@dataclass
class CheckResult:
    label: str
    tokenizer_cases: int = 0
    tokenizer_mismatches: list[str] = field(default_factory=list)
    positions: int = 0
    max_abs_dlogit: float = float("nan")
    mean_abs_dlogit: float = float("nan")
    top1_agreement: float = float("nan")
    tolerance: tuple[float, float] = (0.0, 1.0)
    greedy: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        out = []
        if self.tokenizer_mismatches:
            out.append(
                f"tokenization differs on {len(self.tokenizer_mismatches)} of {self.tokenizer_cases} texts "
                f"(first: {self.tokenizer_mismatches[0]})"
            )
        tol, agree = self.tolerance
        if not self.max_abs_dlogit <= tol:
            out.append(f"max |Δlogit| {self.max_abs_dlogit:.3g} over the tolerance {tol:g}")
        if not self.top1_agreement >= agree:
            out.append(f"top-1 agreement {self.top1_agreement:.1%} under {agree:.0%}")
        ended = sum(g["ended"] for g in self.greedy)
        # float types must end every answer the merged model ends; quantized ones may word an answer differently
        # (a 135M model at 8 bits already does), but a broken end-of-turn setup ends none
        need = len(self.greedy) if self.label in FLOAT_TYPES else min(1, len(self.greedy))
        if ended < need:
            out.append(
                f"{len(self.greedy) - ended} of {len(self.greedy)} greedy answers did not end with the "
                "end-of-turn token"
            )
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "tokenizer_cases": self.tokenizer_cases,
            "tokenizer_mismatches": len(self.tokenizer_mismatches),
            "positions": self.positions,
            "max_abs_dlogit": self.max_abs_dlogit,
            "mean_abs_dlogit": self.mean_abs_dlogit,
            "top1_agreement": self.top1_agreement,
            "tolerance_max_abs_dlogit": self.tolerance[0],
            "tolerance_top1": self.tolerance[1],
            "greedy_ended": sum(g["ended"] for g in self.greedy),
            "greedy_n": len(self.greedy),
            "passed": not self.failures,
        }


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp's C code writes load logs to fd 2 even with verbose=False; keep the user's terminal clean."""
    try:
        fd = os.dup(2)
    except OSError:  # pragma: no cover
        yield
        return
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(fd, 2)
            os.close(fd)


@contextlib.contextmanager
def open_llama(path: Path, lora: Path | None = None, n_ctx: int = 1024):
    """A llama.cpp model with logits for every position, closed on exit."""
    from llama_cpp import Llama

    kwargs: dict[str, Any] = {}
    if lora is not None:
        kwargs["lora_path"] = str(lora)
    with _quiet_stderr():
        llm = Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            logits_all=True,
            verbose=False,
            n_threads=max(1, min(4, os.cpu_count() or 1)),
            seed=0,
            **kwargs,
        )
    try:
        yield llm
    finally:
        llm.close()


@dataclass
class Reference:
    """What the GGUF must reproduce, computed once from the merged transformers model."""

    texts: list[str]  # tokenizer check
    sequences: list[list[int]]  # logits check
    logits: list[np.ndarray]  # [len, vocab] float32 per sequence
    prompts: list[list[int]]  # greedy check (chat prompts ending with the generation prompt)
    answer_lengths: list[int | None]  # tokens of the merged model's own greedy answer; None: it did not end
    eot_ids: set[int]
    tokenizer: Any


def adds_bos(tokenizer: Any, text: str) -> bool:
    """Whether tokenizing `text` should add a BOS: not when the chat template already wrote one (Gemma, Llama 3), as
    in training — a doubled BOS is a prompt the model never saw."""
    return not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))


def hf_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=adds_bos(tokenizer, text))["input_ids"])


def file_type(path: Path) -> str | None:
    """A GGUF file's weight type as TOLERANCE names it (`q4_k_m`, `f16`, ...), from its general.file_type."""
    import gguf

    value = gguf_header.value(path, "general.file_type")
    if value is None:
        return None
    try:
        name = gguf.LlamaFileType(int(value)).name
    except ValueError:
        return None
    return name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


def lora_tolerance(base: Path) -> tuple[float, float]:
    """An adapter GGUF applied to its base carries the base file's quantization noise: the looser of the adapter's
    own tolerance and that of the base's type (the packaged Gemma base is Q4_K_M)."""
    own = TOLERANCE["lora"]
    base_tol = TOLERANCE.get(file_type(base) or "", own)
    return max(own[0], base_tol[0]), min(own[1], base_tol[1])


def run_checks(
    path: Path, ref: Reference, label: str, lora: Path | None = None, tolerance: tuple[float, float] | None = None
) -> CheckResult:
    res = CheckResult(label=label, tolerance=tolerance or TOLERANCE.get(label, TOLERANCE["q4_0"]))
    n_ctx = (
        max(
            [len(s) for s in ref.sequences]
            + [len(p) + 4 * (n or 0) + 64 for p, n in zip(ref.prompts, ref.answer_lengths)]
            + [256]
        )
        + 8
    )
    with open_llama(path, lora=lora, n_ctx=n_ctx) as llm:
        for text in ref.texts:
            want = hf_ids(ref.tokenizer, text)
            got = llm.tokenize(text.encode("utf-8"), add_bos=adds_bos(ref.tokenizer, text), special=True)
            res.tokenizer_cases += 1
            if got != want:
                res.tokenizer_mismatches.append(f"{text[:40]!r}: transformers {want[:8]}… llama.cpp {got[:8]}…")
        worst, total, agree, n = 0.0, 0.0, 0, 0
        for ids, want in zip(ref.sequences, ref.logits):
            llm.reset()
            llm.eval(ids)
            got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
            d = np.abs(got - want)
            worst = max(worst, float(d.max()))
            total += float(d.max(-1).sum())
            agree += int((got.argmax(-1) == want.argmax(-1)).sum())
            n += len(ids)
        res.positions, res.max_abs_dlogit = n, worst
        res.mean_abs_dlogit, res.top1_agreement = total / max(n, 1), agree / max(n, 1)
        for prompt, ref_len in zip(ref.prompts, ref.answer_lengths):
            if ref_len is None:
                continue  # the merged model itself does not end this answer: nothing to hold the GGUF to
            budget = 4 * ref_len + 64  # a quantized model may word its answer differently, not endlessly
            llm.reset()
            out: list[int] = []
            for tok in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
                out.append(int(tok))
                if tok in ref.eot_ids or tok == llm.token_eos() or len(out) >= budget:
                    break
            ended = bool(out) and out[-1] in ref.eot_ids
            text = ref.tokenizer.decode(out[:-1] if ended else out)
            res.greedy.append({"tokens": len(out), "ended": ended, "text": text, "reference_tokens": ref_len})
    return res
