"""The preflight behind `psft-lite validate`: what the recipe will actually train on, and whether it will fit.

Reads the tokenizer and the data (never downloading: hub ids are read from the local cache only), renders a few
examples with the trained tokens highlighted, counts trained tokens and length casualties, flags pad == eos and chat
templates that add no assistant header, and estimates peak memory from the model's config (meta device, no weights).
With `deep`, loads the model and runs one real training micro-step to measure time and memory.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.text import Text

from psft_lite.core.errors import DataError, ModelError
from psft_lite.data.tokenize import Example, pad_eos_note
from psft_lite.model import loading, runtime, scoring
from psft_lite.recipe.schema import Recipe

GB = 2**30


@dataclass
class MemoryEstimate:
    parts: dict[str, float]  # bytes per component
    available: float | None  # bytes available on the device
    device: str

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool | None:
        return None if self.available is None else self.total <= self.available


@dataclass
class PreflightReport:
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    memory: MemoryEstimate | None = None


def available_memory(device: torch.device) -> float | None:
    if device.type == "cuda":
        if not torch.cuda.is_available():  # an estimate for a GPU this machine does not have (bench/what_fits.py)
            return None
        free, _total = torch.cuda.mem_get_info(device)
        return float(free)
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def count_parameters(recipe: Recipe, src: loading.ModelSource) -> tuple[int, int, int, int]:
    """(all parameters, parameters in quantizable linear layers, LoRA parameters, parameters inside the decoder
    layers — what FSDP shards) from the config alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    m = recipe.model
    kwargs: dict[str, Any] = {"trust_remote_code": m.trust_remote_code}
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    cfg = AutoConfig.from_pretrained(src.path, **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=m.trust_remote_code)
    head = model.get_output_embeddings()
    total = sum(p.numel() for p in model.parameters())
    layers = getattr(model.get_decoder(), "layers", None) or []
    in_layers = sum(p.numel() for p in layers.parameters()) if len(layers) else 0
    linear = lora = 0
    targets = recipe.lora.target_modules
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod is not head:
            linear += mod.weight.numel()
            leaf = name.rsplit(".", 1)[-1]
            if (
                targets == "all-linear"
                or (isinstance(targets, list) and leaf in targets)
                or (isinstance(targets, str) and targets != "all-linear" and re.fullmatch(targets, name))
            ):
                lora += recipe.lora.r * (mod.in_features + mod.out_features)
    return total, linear, lora, in_layers


def estimate_memory(
    recipe: Recipe,
    src: loading.ModelSource,
    device: torch.device,
    dtype: torch.dtype,
    seq_len: int,
    response_len: int,
    shards: int = 1,
) -> MemoryEstimate:
    """Weights + LoRA + optimizer + activations for one micro-batch of `seq_len` tokens (the longest in the data), on
    one device; with `shards` > 1, on each of that many processes of a sharded run (train.strategy = "fsdp": each
    holds 1/shards of the decoder layers' weights, LoRA and optimizer state, the embeddings and head whole, and two
    gathered layers at a time — the one computing and the one prefetched)."""
    from transformers import AutoConfig

    total, linear, lora, in_layers = count_parameters(recipe, src)
    kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    cfg = AutoConfig.from_pretrained(src.path, trust_remote_code=recipe.model.trust_remote_code, **kw)
    nbytes = torch.finfo(dtype).bits // 8
    if recipe.model.load_in_4bit:
        per_weight = 0.5 + (0.5 + 4 / 256) / 64 if recipe.model.double_quant else 0.5 + 4 / 64
        weights = linear * per_weight + (total - linear) * nbytes
    else:
        weights = total * nbytes
    opt_bytes = 2 if recipe.train.optimizer != "adamw" and device.type == "cuda" else 8
    b, s = recipe.train.micro_batch_size, seq_len
    h = cfg.hidden_size
    inter = getattr(cfg, "intermediate_size", 4 * h)
    layers = cfg.num_hidden_layers
    per_token_layer = (7 * h + 4 * inter) * nbytes  # inputs each frozen linear needs for backward, attention, norms
    if recipe.model.gradient_checkpointing:
        acts = b * s * (layers * h * nbytes + per_token_layer)
    else:
        acts = b * s * layers * per_token_layer
    rows = min(b * response_len, 2**26 // cfg.vocab_size)
    # psft snapshot keeps the old log-probs of one global batch on the device (its no-grad pass runs before the
    # training forward and frees its activations, so it adds no peak); psft base caches per example in host memory
    o = recipe.objective
    old_lp = recipe.train.batch_size * response_len * 4 if o.kind == "psft" and o.old_policy == "snapshot" else 0
    head = rows * cfg.vocab_size * 4 * 3  # one float32 logits chunk: logits, softmax, gradient
    overhead = 0.5 * GB if device.type == "cuda" else 0.9 * GB  # CUDA context / python + torch + transformers
    parts = {
        "weights": weights,
        "lora + grads + optimizer": lora * (4 + 4 + opt_bytes),
    }
    if shards > 1:  # bf16/fp32 only (4-bit weights cannot be sharded): the layers' weights split, plus two gathered
        one_layer = in_layers / max(layers, 1) * nbytes
        parts = {
            "weights (own shard + embeddings/head)": (total - in_layers) * nbytes + in_layers * nbytes / shards,
            "gathered layers": 2 * one_layer,
            "lora + grads + optimizer": lora * (4 + 4 + opt_bytes) / shards,
        }
    parts = {
        **parts,
        "activations": acts,
        "lm-head chunk": head,
        **({"psft old log-probs": old_lp} if old_lp else {}),
        "runtime": overhead,
    }
    return MemoryEstimate(parts, available_memory(device), device.type)


def sharding_advice(
    recipe: Recipe,
    src: loading.ModelSource,
    device: torch.device,
    dtype: torch.dtype,
    seq_len: int,
    response_len: int,
    available: float,
) -> str:
    """For a recipe one device cannot hold: the fewest devices (2, 4, 8) over which a sharded run would fit each."""
    if recipe.model.load_in_4bit:
        return ' Sharding (train.strategy = "fsdp") cannot split 4-bit weights; it shards the bf16 model.'
    for n in (2, 4, 8):
        est = estimate_memory(recipe, src, device, dtype, seq_len, response_len, shards=n)
        if est.total <= available:
            return (
                f' Or shard it: with train.strategy = "fsdp" over {n} devices the estimate is {est.total / GB:.1f} '
                f"GB each (torchrun --nproc_per_node {n} -m psft_lite train RECIPE)."
            )
    return ' Even sharded over 8 devices (train.strategy = "fsdp") it would not fit.'


def render_example(tokenizer: Any, ex: Example, max_chars: int = 600) -> Text:
    """The example's text with trained tokens highlighted (green) and the prompt dimmed."""
    text = Text()
    pieces = [(tokenizer.decode([int(t)]), bool(m)) for t, m in zip(ex.ids, ex.mask)]
    shown = "".join(p for p, _ in pieces)
    skip = max(0, len(shown) - max_chars)
    if skip:
        text.append("…", style="dim")
    for piece, trained in pieces:
        if skip >= len(piece):
            skip -= len(piece)
            continue
        piece, skip = piece[skip:], 0
        text.append(piece, style="bold green" if trained else "dim")
    return text


def run_preflight(recipe: Recipe, console: Console, deep: bool = False, show: int = 2) -> PreflightReport:
    """Everything validate can check without training. Raises DataError/ModelError for fatal problems."""
    runtime.offline()  # validate never downloads: hub ids come from the local cache
    rep = PreflightReport()
    m = recipe.model
    device = runtime.resolve_device(m.device)
    dtype = runtime.resolve_dtype(m.dtype, device)
    try:
        src = loading.resolve_source(m)
        tokenizer = loading.load_tokenizer(m, src)
    except ModelError:
        if not loading.looks_like_hub_id(m.name):
            raise
        rep.notes.append(
            f"preflight skipped: {m.name} is not in the local Hugging Face cache and validate does not download. "
            "Training will download it."
        )
        return rep
    _check_template(tokenizer, rep)
    examples = _check_data(recipe, tokenizer, rep, console, show, device, dtype)
    longest = rep.stats.get("longest", recipe.data.max_length)
    if "replay_pending" in rep.stats:  # answers not generated yet: allow for their length limit
        longest = min(recipe.data.max_length, longest + rep.stats.pop("replay_pending"))
    resp = max((e.n_trained for e in examples), default=min(longest, recipe.data.max_length))
    try:
        rep.memory = estimate_memory(recipe, src, device, dtype, longest, resp)
    except (OSError, ValueError) as e:
        rep.notes.append(f"memory estimate skipped: {e}")
    if rep.memory is not None and rep.memory.fits is False:
        rep.warnings.append(
            f"estimated peak memory {rep.memory.total / GB:.1f} GB exceeds the {rep.memory.available / GB:.1f} GB "
            f"available on {device.type}: lower train.micro_batch_size or data.max_length, turn on "
            "model.gradient_checkpointing, or set model.load_in_4bit = true."
            + (
                sharding_advice(recipe, src, device, dtype, longest, resp, rep.memory.available)
                if device.type == "cuda"
                else ""
            )
        )
    if deep and examples:
        rep.stats.update(deep_check(recipe, examples, tokenizer, device, dtype, src))
    return rep


def _check_template(tokenizer: Any, rep: PreflightReport) -> None:
    """pad == eos (said, not wrong), and a chat template whose generation prompt adds nothing (wrong)."""
    note = pad_eos_note(tokenizer)
    if note:
        rep.notes.append(note)
    probe = [{"role": "user", "content": "Hi"}]
    plain = tokenizer.apply_chat_template(probe, tokenize=False)
    if plain == tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True):
        rep.warnings.append(
            "the chat template adds no assistant header for generation (add_generation_prompt has no effect): "
            "prompts and responses will run together at inference."
        )


def _check_data(
    recipe: Recipe,
    tokenizer: Any,
    rep: PreflightReport,
    console: Console,
    show: int,
    device: Any = None,
    dtype: Any = None,
) -> list:
    """Tokenize the training data as training will (every source, and the self-replay answers when they are cached);
    record its statistics and each source's share of an epoch, warn about what was cut, and show the first `show`
    examples with their trained tokens marked. A hub data set not in the cache is skipped."""
    from psft_lite.data import load_sources, total_stats
    from psft_lite.data.batching import epoch_draws

    base_dir = recipe.path.parent if recipe.path else None
    d = recipe.data
    try:
        sources = load_sources(d, tokenizer, base_dir=base_dir)
    except DataError as e:
        missing = [s.path for s in d.train if s.path and not os.path.exists(s.path)]
        if "Hugging Face Hub" in str(e) and missing:
            rep.notes.append(f"data preflight skipped: {missing[0]} is not in the local cache.")
            return []
        raise
    if d.replay.ratio > 0:
        replayed = _replay_source(recipe, tokenizer, device, dtype, rep)
        if replayed is not None:
            sources.append(replayed)
    stats = total_stats([s.stats for s in sources])
    share = stats.trained_tokens / max(stats.total_tokens, 1)
    rep.stats = {
        "examples": stats.kept,
        "rows": stats.rows,
        "trained_tokens": stats.trained_tokens,
        "total_tokens": stats.total_tokens,
        "trained_share": share,
        "dropped_too_long": stats.dropped_too_long,
        "truncated": stats.truncated,
        "longest": stats.max_len,
    }
    user = [len(s.examples) for s in sources if s.name != "self-replay"]
    replay = (len(sources[-1].examples), d.replay.ratio) if sources[-1].name == "self-replay" else None
    if len(sources) > 1:
        draws = epoch_draws(user, d.weights, replay)
        rep.stats["sources"] = [
            {
                "name": s.name,
                "examples": len(s.examples),
                "trained_tokens": s.stats.trained_tokens,
                "share": k / sum(draws),
            }
            for s, k in zip(sources, draws)
        ]
    if stats.dropped_too_long or stats.truncated:
        rep.warnings.append(
            f"{stats.dropped_too_long} examples dropped and {stats.truncated} truncated at data.max_length = "
            f"{d.max_length}."
        )
    if share < 0.05:
        rep.warnings.append(f"only {share:.1%} of tokens are trained: long prompts, short responses.")
    examples = [e for s in sources for e in s.examples]
    for ex in examples[:show]:
        console.print(Text(f"── {ex.where}  ({ex.n_trained} trained of {len(ex)} tokens)", style="bold"))
        console.print(render_example(tokenizer, ex))
    return examples


def _replay_source(recipe: Recipe, tokenizer: Any, device: Any, dtype: Any, rep: PreflightReport) -> Any:
    """The self-replay answers as a source when this base's are cached; else a note (and None): they are generated
    once, at the start of the first training run, and the memory estimate allows for their length limit."""
    from psft_lite.data import SourceData
    from psft_lite.inference import replay

    d = recipe.data
    prompts = replay.read_prompts(d.replay, recipe.path.parent if recipe.path else None)
    spec = recipe.model.model_dump(mode="json", exclude_none=True)
    rows = replay.read_cache(replay.cache_file(runtime.home(), spec, str(dtype), device.type, prompts, d))
    if rows is None:
        rep.notes.append(
            f"self-replay: the base model's answers to {len(prompts)} prompts are not generated yet; training "
            "generates them once (cached for later runs). The counts above leave them out."
        )
        rep.stats["replay_pending"] = d.replay.max_new_tokens
        return None
    examples, stats = replay.encode_answers(tokenizer, rows, d)
    return SourceData("self-replay", examples, stats)


def deep_check(
    recipe: Recipe,
    examples: list[Example],
    tokenizer: Any,
    device: torch.device,
    dtype: torch.dtype,
    src: loading.ModelSource,
) -> dict[str, Any]:
    """Load the model with LoRA and time one forward/backward on the longest micro-batch."""
    from psft_lite.data.batching import collate
    from psft_lite.tracking.metrics import peak_memory_mb

    base = loading.load_base_model(recipe.model, device, dtype, src)
    model = loading.attach_lora(base, recipe.lora, recipe.model.gradient_checkpointing)
    model.train()
    longest = sorted(range(len(examples)), key=lambda i: -len(examples[i]))[: recipe.train.micro_batch_size]
    b = collate([examples[i] for i in longest], longest, tokenizer.pad_token_id).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with scoring.autocast(device, dtype):
        logp, _ = scoring.response_logprobs(model, b)
    (-(logp * b.target_mask).sum() / b.n_trained).backward()
    return {
        "deep_step_s": time.perf_counter() - t0,
        "deep_peak_mem_mb": peak_memory_mb(device),
        "trainable_parameters": sum(p.numel() for p in scoring.trainable_parameters(model)),
    }
