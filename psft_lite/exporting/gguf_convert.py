"""psft-lite's own transformers → GGUF converter, for the model families psft-lite trains.

Written after reading how llama.cpp's converter treats each family (not copied from it):
- llama (Llama 2/3.x, SmolLM/SmolLM2) and mistral map to llama.cpp's `llama` architecture. llama.cpp rotates
  adjacent pairs of each attention head's rows (the original Meta layout), transformers rotates the two halves
  (`rotate_half`), so q_proj/k_proj rows are permuted back per head. Llama 3.1+ "llama3" RoPE scaling becomes a
  `rope_freqs` tensor of per-frequency factors.
- qwen2 (Qwen2/2.5) maps to `qwen2`: llama.cpp runs it with the half-rotation, so nothing is permuted; it has q/k/v
  biases.
- gemma3 (Gemma 3 text models, e.g. 270M) maps to `gemma3`: half-rotation (no permutation); transformers' Gemma
  RMSNorm multiplies by (1 + w) where llama.cpp multiplies by w, so every norm weight is written plus one; the
  embedding stays unscaled (both scale it by √d at run time); sliding-window layers and the global RoPE base are
  written as hyper-parameters (llama.cpp knows Gemma 3's local base and layer pattern).
Tensor names come from the gguf package's own name map. 1-D tensors (norms, biases) stay float32, as llama.cpp
expects. The tokenizer is written in full (vocabulary, merges, token types, the BPE pre-tokenizer llama.cpp must
apply, special ids, add-bos) with the chat template the run trained with; a base that came from a GGUF (the
embedded default) hands over its own tokenizer metadata unchanged.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from psft_lite.core.errors import ModelError
from psft_lite.model.chat import end_of_turn_id

# ---------------------------------------------------------------------------------------------------------------------
# Families and quant types


@dataclass(frozen=True)
class Family:
    arch: str  # llama.cpp's architecture name
    permute_qk: bool  # transformers' half-rotation RoPE rows → llama.cpp's adjacent-pair rows
    norm_plus_one: bool = False  # transformers stores RMSNorm weights as an offset from 1 (Gemma)


FAMILIES = {
    "llama": Family("llama", True),
    "mistral": Family("llama", True),
    "qwen2": Family("qwen2", False),
    "qwen3": Family("qwen3", False),
    "gemma3_text": Family("gemma3", False, norm_plus_one=True),
    "phi3": Family("phi3", False),
}


def family(config: Any) -> Family:
    """The family of a transformers config, or a clear refusal before any work is done."""
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        raise ModelError(
            f"GGUF export does not support the architecture {kind!r} ({', '.join(config.architectures or [])}). "
            f"psft-lite's converter writes {', '.join(sorted(FAMILIES))} models (Llama 2/3.x, SmolLM2, Mistral, "
            "Qwen2/2.5, Qwen3, Gemma 3 text, Phi-3). Export the merged folder with `psft-lite merge` and convert it "
            "with llama.cpp's convert_hf_to_gguf.py instead."
        )
    if getattr(config, "rope_scaling", None) and (config.rope_scaling.get("rope_type") or "default") not in (
        "default",
        "llama3",
        "linear",
    ):
        raise ModelError(
            f"GGUF export: RoPE scaling {config.rope_scaling.get('rope_type')!r} is not handled by psft-lite's "
            "converter (default, linear and llama3 are)."
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if kind == "gemma3_text" and getattr(config, "query_pre_attn_scalar", head_dim) != head_dim:
        raise ModelError(
            f"GGUF export: this Gemma 3 scales attention by query_pre_attn_scalar = {config.query_pre_attn_scalar}, "
            f"not by its head size {head_dim}; llama.cpp would compute different attention. Export the merged folder "
            "with llama.cpp's convert_hf_to_gguf.py instead."
        )
    if kind == "phi3" and getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        raise ModelError("GGUF export: Phi models with partial rotary embeddings (Phi-3.5/4 mini) are not handled.")
    return FAMILIES[kind]


@dataclass(frozen=True)
class Quant:
    name: str
    file_type: int  # gguf.LlamaFileType value written as general.file_type
    tensor_type: str | None  # gguf.GGMLQuantizationType name for the 2-D weights; None: llama.cpp quantizes
    source: str = "f32"  # K-quants: the GGUF llama.cpp's quantizer reads (written by us first)


def _quants() -> dict[str, Quant]:
    from gguf import LlamaFileType as F

    return {
        "f32": Quant("f32", F.ALL_F32, "F32"),
        "f16": Quant("f16", F.MOSTLY_F16, "F16"),
        "bf16": Quant("bf16", F.MOSTLY_BF16, "BF16"),
        "q8_0": Quant("q8_0", F.MOSTLY_Q8_0, "Q8_0"),
        "q4_0": Quant("q4_0", F.MOSTLY_Q4_0, "Q4_0"),
        "q4_k_m": Quant("q4_k_m", F.MOSTLY_Q4_K_M, None),
        "q5_k_m": Quant("q5_k_m", F.MOSTLY_Q5_K_M, None),
        "q6_k": Quant("q6_k", F.MOSTLY_Q6_K, None),
    }


QUANT_NAMES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")


def parse_quants(spec: str) -> list[Quant]:
    """`q8_0` or a comma list `f16,q8_0,q4_k_m` → quant types, in order, without repeats."""
    table = _quants()
    names = [s.strip().lower() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in table]
    if not names or bad:
        raise ModelError(
            f"--quant {spec!r}: {'unknown type ' + ', '.join(map(repr, bad)) if bad else 'empty'}. Choose from "
            f"{', '.join(QUANT_NAMES)} (a comma list writes several)."
        )
    return [table[n] for n in dict.fromkeys(names)]


def needs_llama_cpp(quant: Quant) -> bool:
    return quant.tensor_type is None


# ---------------------------------------------------------------------------------------------------------------------
# Tensors


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Per head, rows [x0..x(d/2-1), y0..] (half-rotation) → [x0, y0, x1, y1, ...] (adjacent pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _heads(config: Any) -> tuple[int, int]:
    n_head = config.num_attention_heads
    return n_head, getattr(config, "num_key_value_heads", None) or n_head


def gguf_tensors(
    state: dict[str, torch.Tensor], config: Any, fam: Family, *, consume: bool = False
) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every tensor of a causal LM state dict. `consume` pops each tensor from
    `state` as it goes, so a large model is not held twice."""
    import gguf

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == fam.arch)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    n_head, n_kv = _heads(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for key in list(state):
        if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
            if consume:
                state.pop(key)
            continue
        t = state.pop(key) if consume else state[key]
        if fam.permute_qk and key.endswith(("q_proj.weight", "q_proj.bias")):
            t = permute_rows(t, n_head)
        elif fam.permute_qk and key.endswith(("k_proj.weight", "k_proj.bias")):
            t = permute_rows(t, n_kv)
        elif fam.norm_plus_one and key.endswith("norm.weight"):
            t = t.float() + 1.0
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(f"GGUF export: no GGUF name for the tensor {key!r} of a {config.model_type} model.")
        yield name, t.detach().to(torch.float32).cpu().numpy()
    rope = getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type") == "llama3":
        yield "rope_freqs.weight", llama3_rope_factors(config)


def llama3_rope_factors(config: Any) -> np.ndarray:
    """Llama 3.1's per-frequency RoPE factors (smooth between the low- and high-frequency wavelengths), which
    llama.cpp reads as the `rope_freqs` tensor."""
    r = config.rope_scaling
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = _rope_theta(config)
    factor, lo, hi = r.get("factor", 8.0), r.get("low_freq_factor", 1.0), r.get("high_freq_factor", 4.0)
    ctx = r.get("original_max_position_embeddings", 8192)
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < ctx / hi:
            out.append(1.0)
        elif wavelen > ctx / lo:
            out.append(factor)
        else:
            smooth = (ctx / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _rope_theta(config: Any) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it in rope_parameters (per layer type for sliding-window models)
        params = getattr(config, "rope_parameters", None) or {}
        params = params.get("full_attention", params)
        theta = params.get("rope_theta", 10000.0)
    return float(theta)


def encode_tensor(name: str, data: np.ndarray, quant: Quant) -> tuple[np.ndarray, Any]:
    """(bytes-or-array, GGML type) for one tensor: 1-D stays F32; rows a block type cannot split fall back to F16."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    qtype = Q[quant.tensor_type or quant.source.upper()]
    if qtype in (Q.Q4_0,) and name in ("token_embd.weight", "output.weight"):
        qtype = Q.Q8_0  # as llama.cpp's quantizer does, the (often tied) output projection keeps 8 bits
    if data.ndim <= 1 or name == "rope_freqs.weight":
        qtype = Q.F32
    elif qtype not in (Q.F32, Q.F16, Q.BF16) and data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = Q.F16
    if qtype == Q.F32:
        return data.astype(np.float32, copy=False), Q.F32
    if qtype == Q.F16:
        return data.astype(np.float16), Q.F16
    return gguf.quants.quantize(data, qtype), qtype


# ---------------------------------------------------------------------------------------------------------------------
# Hyper-parameters


def write_hparams(writer: Any, config: Any, fam: Family) -> None:
    n_head, n_kv = _heads(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(n_head))
    writer.add_head_count_kv(int(n_kv))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(int(head_dim))
    if head_dim * n_head != config.hidden_size or fam.arch == "gemma3":
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    if fam.arch in ("gemma3", "phi3") and getattr(config, "sliding_window", None):
        writer.add_sliding_window(int(config.sliding_window))
    writer.add_vocab_size(int(config.vocab_size))
    rope = getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type") == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer


@dataclass
class TokenizerMeta:
    """The tokenizer.* key/values of a GGUF, as (key, value, GGUFValueType, sub type) rows."""

    rows: list[tuple[str, Any, Any, Any]] = field(default_factory=list)
    pre: str = ""
    source: str = ""  # where it came from, for messages

    def write(self, writer: Any) -> None:
        for key, value, vtype, sub in self.rows:
            writer.add_key_value(key, value, vtype, sub_type=sub)


def tokenizer_from_gguf(path: Path, chat_template: str | None, tokenizer: Any = None) -> TokenizerMeta:
    """Every tokenizer.* field of a source GGUF, with the chat template the run trained with. A SentencePiece-style
    vocabulary whose GGUF leaves add_space_prefix unsaid (llama.cpp then prepends a space) gets what `tokenizer`,
    the one trained with, does (Gemma: no prefix)."""
    from gguf import GGUFValueType as V

    from psft_lite.exporting import gguf_header

    meta = TokenizerMeta(source=str(path))
    for key, value, vtype, sub in gguf_header.fields(
        path, keep=lambda k: k.startswith("tokenizer.") and k != "tokenizer.chat_template"
    ):
        meta.rows.append((key, value, V(vtype), None if sub is None else V(sub)))
        if key == "tokenizer.ggml.pre":
            meta.pre = value
    values = {k: v for k, v, *_ in meta.rows}
    spm = values.get("tokenizer.ggml.model") == "llama"
    if spm and tokenizer is not None and "tokenizer.ggml.add_space_prefix" not in values:
        prefix = adds_space_prefix(json.loads(tokenizer.backend_tokenizer.to_str()))
        meta.rows.append(("tokenizer.ggml.add_space_prefix", prefix, V.BOOL, None))
    if chat_template:
        meta.rows.append(("tokenizer.chat_template", chat_template, V.STRING, None))
    return meta


# The BPE pre-tokenizers psft-lite recognises, by what tokenizer.json says they do → llama.cpp's name for them.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_signature(pre: dict[str, Any] | None) -> tuple:
    if not pre:
        return ()
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    sig = []
    for p in parts or []:
        if p["type"] == "Split":
            pattern = p.get("pattern", {})
            sig.append(("Split", pattern.get("Regex") or pattern.get("String")))
        elif p["type"] == "Digits":
            sig.append(("Digits", bool(p.get("individual_digits"))))
        elif p["type"] == "ByteLevel":
            sig.append(("ByteLevel", bool(p.get("use_regex", True))))
        else:
            sig.append((p["type"],))
    return tuple(sig)


PRE_TOKENIZERS = {
    (("Split", LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
    (("Split", QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("ByteLevel", True),): "gpt-2",
}


def bpe_pre_tokenizer(tokenizer_json: dict[str, Any], where: str) -> str:
    sig = _pre_signature(tokenizer_json.get("pre_tokenizer"))
    name = PRE_TOKENIZERS.get(sig)
    if name is None:
        raise ModelError(
            f"{where}: GGUF export does not recognise this tokenizer's pre-tokenizer ({sig or 'none'}); llama.cpp "
            "would split text differently from training. Recognised: Llama 3, Qwen2, SmolLM and GPT-2 byte-level BPE, "
            "and Llama/Mistral SentencePiece-style BPE."
        )
    return name


def adds_space_prefix(tokenizer_json: dict[str, Any]) -> bool:
    """Whether a SentencePiece-style tokenizer.json puts "▁" before the text (Llama 2, Mistral) or not (Gemma)."""
    parts = []
    for section in ("normalizer", "pre_tokenizer"):
        node = tokenizer_json.get(section) or {}
        parts += node.get("normalizers") or node.get("pretokenizers") or [node]
    for p in parts:
        if p.get("type") == "Prepend":
            return True
        if p.get("type") == "Metaspace":
            return p.get("prepend_scheme", "always" if p.get("add_prefix_space", True) else "never") != "never"
    return False


def _vocab_table(tokenizer: Any, n_vocab: int, spm_style: bool) -> tuple[list[str], list[Any], list[float]]:
    """Every id's token text, GGUF token type and score; ids the tokenizer does not use are UNUSED `[PADi]`."""
    import gguf

    added = tokenizer.added_tokens_decoder
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    tokens, types, scores = [], [], []
    for i in range(n_vocab):
        tok = reverse.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(tok)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif spm_style and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tok):
            tokens.append(tok)
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(tok)
            types.append(gguf.TokenType.NORMAL)
        scores.append(-float(i))
    return tokens, types, scores


def _special_ids(tokenizer: Any) -> list[tuple[str, Any, Any, Any]]:
    """bos, eos, unknown, padding and end-of-turn ids as GGUF metadata rows (those the tokenizer has)."""
    from gguf import GGUFValueType as V

    ids = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unknown": tokenizer.unk_token_id,
        "padding": tokenizer.pad_token_id,
        "eot": end_of_turn_id(tokenizer),
    }
    return [(f"tokenizer.ggml.{k}_token_id", int(v), V.UINT32, None) for k, v in ids.items() if v is not None]


def tokenizer_from_hf(tokenizer: Any, config: Any, where: str) -> TokenizerMeta:
    """Vocabulary, merges, token types, pre-tokenizer and special ids from a fast (tokenizer.json) tokenizer."""
    from gguf import GGUFValueType as V

    tj = json.loads(tokenizer.backend_tokenizer.to_str())
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise ModelError(
            f"{where}: GGUF export handles BPE tokenizers (tokenizer.json model {model.get('type')!r} is not)."
        )
    spm_style = bool(model.get("byte_fallback"))  # Llama 2 / Mistral: SentencePiece pieces with byte fallback
    tokens, types, scores = _vocab_table(tokenizer, int(config.vocab_size), spm_style)
    meta = TokenizerMeta(source=where)
    rows = meta.rows
    if spm_style:
        meta.pre = "default"
        rows.append(("tokenizer.ggml.model", "llama", V.STRING, None))
        rows.append(("tokenizer.ggml.pre", "default", V.STRING, None))
        rows.append(("tokenizer.ggml.scores", scores, V.ARRAY, V.FLOAT32))
    else:
        meta.pre = bpe_pre_tokenizer(tj, where)
        rows.append(("tokenizer.ggml.model", "gpt2", V.STRING, None))
        rows.append(("tokenizer.ggml.pre", meta.pre, V.STRING, None))
    rows.append(("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING))
    rows.append(("tokenizer.ggml.token_type", [int(t) for t in types], V.ARRAY, V.INT32))
    if not spm_style:
        merges = model.get("merges") or []
        merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
        rows.append(("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING))
    rows += _special_ids(tokenizer)
    probe = tokenizer("a")["input_ids"]
    add_bos = bool(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id])
    rows.append(("tokenizer.ggml.add_bos_token", add_bos, V.BOOL, None))
    rows.append(("tokenizer.ggml.add_eos_token", False, V.BOOL, None))
    if spm_style:
        rows.append(("tokenizer.ggml.add_space_prefix", adds_space_prefix(tj), V.BOOL, None))
    if tokenizer.chat_template:
        rows.append(("tokenizer.chat_template", tokenizer.chat_template, V.STRING, None))
    return meta


# ---------------------------------------------------------------------------------------------------------------------
# Files


def write_model_gguf(
    path: Path,
    state: dict[str, torch.Tensor],
    config: Any,
    tokenizer_meta: TokenizerMeta,
    quant: Quant,
    general: dict[str, str],
    *,
    consume: bool = False,
) -> None:
    """One GGUF model file at `path` (the caller renames it into place)."""
    import gguf

    fam = family(config)
    writer = gguf.GGUFWriter(path, fam.arch)
    writer.add_type(gguf.GGUFType.MODEL)
    for key, value in general.items():
        writer.add_string(f"general.{key}", value)
    write_hparams(writer, config, fam)
    writer.add_file_type(int(quant.file_type if quant.tensor_type else _quants()[quant.source].file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokenizer_meta.write(writer)
    for name, data in gguf_tensors(state, config, fam, consume=consume):
        encoded, qtype = encode_tensor(name, data, quant)
        writer.add_tensor(name, encoded, raw_dtype=qtype)
        del data
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_lora_gguf(
    path: Path,
    adapter_state: dict[str, torch.Tensor],
    adapter_config: dict[str, Any],
    config: Any,
    general: dict[str, str],
) -> int:
    """A llama.cpp LoRA adapter: for each adapted weight W (out × in), `<name>.lora_a` (r × in) and `<name>.lora_b`
    (out × r), q/k rows permuted like W, and adapter.lora.alpha so that llama.cpp's alpha / r is peft's scaling.
    Returns the number of adapted weights."""
    import gguf

    fam = family(config)
    if adapter_config.get("use_dora"):
        raise ModelError("GGUF export: DoRA adapters cannot be written as llama.cpp LoRA files; export merged.")
    r = int(adapter_config["r"])
    alpha = float(adapter_config["lora_alpha"])
    if adapter_config.get("use_rslora"):
        alpha *= math.sqrt(r)  # peft scales by alpha/sqrt(r); llama.cpp by alpha/r
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
        raise ModelError("GGUF export: adapters with per-module rank or alpha patterns are not supported.")
    extra = sorted(k for k in adapter_state if ".lora_A." not in k and ".lora_B." not in k)
    if adapter_config.get("modules_to_save") or extra:
        raise ModelError(
            "GGUF export: the adapter also trains whole modules (modules_to_save"
            + (f", e.g. {extra[0]}" if extra else "")
            + "), which a llama.cpp LoRA file cannot carry; export the merged model instead (without --adapter-only)."
        )
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == fam.arch)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    n_head, n_kv = _heads(config)
    writer = gguf.GGUFWriter(path, fam.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for key, value in general.items():
        writer.add_string(f"general.{key}", value)
    n = 0
    for key in sorted(adapter_state):
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0]
        a = adapter_state[key].float()
        b = adapter_state[module + ".lora_B.weight"].float()
        hf = re.sub(r"^(base_model\.model\.)+", "", module) + ".weight"
        if hf.endswith("q_proj.weight") and fam.permute_qk:
            b = permute_rows(b, n_head)
        elif hf.endswith("k_proj.weight") and fam.permute_qk:
            b = permute_rows(b, n_kv)
        name = names.get_name(hf, try_suffixes=(".weight",))
        if name is None or "token_embd" in name or name.startswith("output."):
            raise ModelError(f"GGUF export: the adapter trains {hf!r}, which a llama.cpp LoRA file cannot carry here.")
        writer.add_tensor(name + ".lora_a", a.contiguous().numpy())
        writer.add_tensor(name + ".lora_b", b.contiguous().numpy())
        n += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return n
