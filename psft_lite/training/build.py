"""Building a run: load and check everything one training run needs (recipe, data, model + LoRA, optimizer, old
policy, guard) into one `Run`. Nothing is written to the run directory here."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from psft_lite.core import rundir
from psft_lite.core.errors import RecipeError
from psft_lite.data import EncodeStats, Example, SourceData, load_examples, load_sources, total_stats
from psft_lite.data.batching import Batch, DataPlan, StepData, epoch_draws, pack_examples
from psft_lite.data.tokenize import pad_eos_note
from psft_lite.exporting import outputs
from psft_lite.model import loading, runtime, scoring
from psft_lite.recipe.schema import Recipe, TrainSection
from psft_lite.tracking.trackers import require
from psft_lite.training import sharding
from psft_lite.training.distributed import Dist
from psft_lite.training.guard import Guard
from psft_lite.training.objectives import OBJECTIVES, Objective, method_name
from psft_lite.training.policy import OldPolicy, ReferenceCache, build_policy


@dataclass(kw_only=True)
class Run:
    """Everything one training run holds; `build` makes it whole."""

    recipe: Recipe
    objective: Objective
    device: torch.device
    dtype: torch.dtype
    tokenizer: Any
    model: Any
    data: StepData
    data_stats: EncodeStats
    total_steps: int
    optimizer: torch.optim.Optimizer
    policy: OldPolicy | None
    guard: Guard
    reference: ReferenceCache | None = None  # the base's hidden states per example (sft_kl, asft)
    console: Console
    dist: Dist = field(default_factory=Dist)
    scaler: Any = None  # torch.amp.GradScaler for fp16 (dynamic loss scaling); None for bf16/fp32
    eval_examples: list[Example] = field(default_factory=list)  # data.eval, tokenized (reference NLL)
    eval_items: list[Any] = field(default_factory=list)  # the first eval.samples problems (generation accuracy)
    final_items: dict[str, list[Any]] = field(default_factory=dict)  # eval.final's sets, read before the model loads

    @property
    def run_dir(self) -> Path:
        return self.recipe.run_dir

    @property
    def examples(self) -> list[Example]:
        return self.data.examples

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def step_batches(self, step: int) -> list[Batch]:
        return self.data.batches(step)

    def amp(self) -> Any:
        return scoring.autocast(self.device, self.dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def loss_scaler(device: torch.device, dtype: torch.dtype) -> Any:
    """fp16 gradients underflow without loss scaling (bf16 and fp32 have fp32's range): a GradScaler for fp16."""
    if dtype != torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


def build_optimizer(
    params: list[torch.nn.Parameter], t: TrainSection, device: torch.device, console: Console
) -> torch.optim.Optimizer:
    if t.optimizer != "adamw" and device.type == "cuda":
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if t.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        return cls(params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)
    if t.optimizer != "adamw":
        console.print(
            f"[yellow]note:[/yellow] train.optimizer = {t.optimizer!r} needs CUDA; using AdamW on {device.type}."
        )
    fused = device.type == "cuda"
    return torch.optim.AdamW(params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay, fused=fused)


@dataclass
class DataIn:
    """What `load_data` read before the model loads: the training sources and every eval file a run will read."""

    sources: list[SourceData]
    eval_examples: list[Example]
    eval_items: list[Any]
    final_items: dict[str, list[Any]]


def load_data(recipe: Recipe, tokenizer: Any, console: Console) -> DataIn:
    """The training sources (each in its own format), the eval examples and problems, and the final evaluation's sets
    (each read in its own format); reported. Every file a run will read fails here, before the model loads."""
    d, base_dir = recipe.data, recipe.path.parent if recipe.path else None
    sources = load_sources(d, tokenizer, base_dir=base_dir)
    eval_examples, eval_items = [], []
    if d.eval is not None:  # fail now, not after training, if the eval data is unusable
        eval_examples, _ = load_examples(d.eval, d, tokenizer, base_dir=base_dir)
        if recipe.eval.every and recipe.eval.samples:
            from psft_lite.inference.evaluate import eval_items as read_items

            eval_items = read_items(d.eval, d, limit=recipe.eval.samples, base_dir=base_dir)
    final_items = {}
    if recipe.eval.final:
        from psft_lite.inference.evaluate import recipe_eval_items

        final_items = recipe_eval_items(recipe)
        if recipe.eval.retention:
            from psft_lite.inference.retention import load_suite

            load_suite(kinds=recipe.eval.retention_kinds)
    report_data(console, total_stats([s.stats for s in sources]), tokenizer)
    return DataIn(sources, eval_examples, eval_items, final_items)


def self_replay(
    recipe: Recipe, base: Any, tokenizer: Any, device: torch.device, dtype: torch.dtype, console: Console, dist: Dist
) -> SourceData:
    """`data.replay`: the base model's own answers to the replay prompts as a training source — read from the cache,
    or generated once (rank 0; the other ranks wait and read it)."""
    from psft_lite.inference import replay
    from psft_lite.inference.generate import Loaded as Model

    d = recipe.data
    prompts = replay.read_prompts(d.replay, recipe.path.parent if recipe.path else None)
    spec = recipe.model.model_dump(mode="json", exclude_none=True)
    path = replay.cache_file(runtime.home(), spec, str(dtype), device.type, prompts, d)
    how = f"read from the cache ({path})"
    if replay.read_cache(path) is None and dist.is_main:
        was = base.training
        base.eval()
        seconds = replay.generate_answers(Model(base, tokenizer, "base", device, dtype), prompts, d, path, console)
        base.train(was)
        how = f"generated in {seconds:.0f} s (cached in {path})"
    dist.barrier()
    rows = replay.read_cache(path) or []
    ended = sum(r["finished"] for r in rows)
    if dist.is_main:
        console.print(
            f"self-replay: the base model's answers to {len(prompts)} prompts, {how}; "
            f"{ended} ended within data.replay.max_new_tokens = {d.replay.max_new_tokens}"
            + (
                f"; the {len(rows) - ended} cut by it are trained up to the cut"
                if d.replay.unfinished == "train"
                else ""
            )
        )
    examples, stats = replay.encode_answers(tokenizer, rows, d)
    if not examples:
        where = f"data.replay: none of the base model's {len(rows)} answers to {replay.prompt_file(d.replay)}"
        if d.replay.unfinished == "train":  # cut answers are trained too: each was empty, or ended and was too long
            raise RecipeError(
                f"{where} left anything to train: each was empty, or ended but was longer than data.max_length = "
                f"{d.max_length} tokens. Raise data.max_length, or check data.system_prompt and the prompts in "
                f"{replay.prompt_file(d.replay)}."
            )
        raise RecipeError(
            f"{where} ended within data.replay.max_new_tokens = {d.replay.max_new_tokens} tokens and "
            "data.max_length; raise them, or, for a base model that rarely ends a chat turn, set "
            'data.replay.unfinished = "train" to train answers up to the cut.'
        )
    return SourceData("self-replay", examples, stats)


def assemble(recipe: Recipe, sources: list[SourceData], console: Console) -> tuple[list[Example], tuple, tuple]:
    """The sources as one list of examples (each source packed on its own, if asked), with each source's size and
    its draws per epoch; the mix is reported when there is one."""
    d = recipe.data
    parts = []
    for s in sources:
        parts.append(pack_examples(s.examples, d.max_length) if d.packing else s.examples)
    if d.packing:
        n_before, n_after = sum(len(s.examples) for s in sources), sum(len(p) for p in parts)
        rows = [e for p in parts for e in p]
        fill = sum(len(e) for e in rows) / (len(rows) * max(len(e) for e in rows))
        console.print(
            f"packing: {n_before} examples into {n_after} rows of up to {d.max_length} tokens ({fill:.0%} of "
            "the longest row's length filled on average)"
        )
    sizes = [len(p) for p in parts]
    replay = (sizes.pop(), d.replay.ratio) if d.replay.ratio > 0 else None
    draws = epoch_draws(sizes, d.weights, replay)
    sizes = sizes + ([replay[0]] if replay else [])
    if len(sources) > 1:
        for s, k in zip(sources, draws):
            console.print(
                f"  {s.name}: {len(s.examples)} examples, {s.stats.trained_tokens:,} trained tokens; "
                f"{k / sum(draws):.1%} of the {sum(draws)} examples drawn per epoch"
            )
    return [e for p in parts for e in p], tuple(sizes), tuple(draws)


def report_data(console: Console, s: EncodeStats, tokenizer: Any) -> None:
    console.print(
        f"data: {s.kept} examples ({s.rows} rows), {s.trained_tokens:,} trained of {s.total_tokens:,} tokens, longest "
        f"{s.max_len}"
        + (f", {s.dropped_too_long} dropped as too long" if s.dropped_too_long else "")
        + (f", {s.truncated} truncated" if s.truncated else "")
    )
    if s.truncated:
        console.print(
            "[yellow]warning:[/yellow] truncated responses lose their end-of-turn token; raise data.max_length."
        )
    if s.eos_appended:
        console.print(
            f"note: the chat template ends assistant turns without a special token; appended eos to {s.eos_appended}."
        )
    note = pad_eos_note(tokenizer)
    if note:
        console.print(f"note: {note}")


def check_before_loading(recipe: Recipe, dist: Dist, overwrite: bool, resuming: bool) -> None:
    """Everything about the recipe and the run directory that can fail before a model is loaded (and hours trained)."""
    t = recipe.train
    require(recipe.output.report_to, f"{recipe.path}: output.report_to" if recipe.path else "output.report_to")
    outputs.check(recipe.output.save, str(recipe.path or "the recipe"))
    if recipe.data.replay.ratio > 0:  # the prompt file, before any model loads
        from psft_lite.inference.replay import read_prompts

        read_prompts(recipe.data.replay, recipe.path.parent if recipe.path else None)
    if t.batch_size % (t.micro_batch_size * dist.world):
        raise RecipeError(
            f"train.batch_size ({t.batch_size}) must be a multiple of train.micro_batch_size ({t.micro_batch_size}) × "
            f"the {dist.world} processes, so every process gets whole micro-batches of each global batch."
        )
    if dist.sharded:
        sharding.check_supported(recipe.model.load_in_4bit)  # before loading a model too big for one device
    if not resuming:
        rundir.check_output_dir(recipe.run_dir, overwrite)
    elif not rundir.is_run_dir(recipe.run_dir):
        raise RecipeError(f"--resume: {recipe.run_dir} is not a psft-lite run directory (output.dir of this recipe).")


def build(
    recipe: Recipe, console: Console, overwrite: bool = False, resuming: bool = False, dist: Dist | None = None
) -> Run:
    """Load and check everything a run needs; nothing is written to the run directory yet."""
    dist = dist or Dist()
    t, m = recipe.train, recipe.model
    check_before_loading(recipe, dist, overwrite, resuming)
    for w in recipe.warnings():
        console.print(f"[yellow]warning:[/yellow] {w}")
    seed_everything(t.seed)
    device = runtime.resolve_device(m.device)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
    if device.type == "cuda":  # peak_mem_mb is this run's, not the process's (a study trains many runs in one)
        torch.cuda.reset_peak_memory_stats(device)
    dtype = runtime.resolve_dtype(m.dtype, device)
    if m.name in loading.packaged.PACKAGED and not (runtime.home() / "models" / m.name / "config.json").exists():
        console.print(f"converting the packaged model {m.name} into {runtime.home() / 'models'} (once)")
    src = loading.resolve_source(m)
    tokenizer = loading.load_tokenizer(m, src)
    data_in = load_data(recipe, tokenizer, console)
    base = loading.load_base_model(m, device, dtype, src)
    sources = list(data_in.sources)
    if recipe.data.replay.ratio > 0:
        sources.append(self_replay(recipe, base, tokenizer, device, dtype, console, dist))
    examples, sizes, draws = assemble(recipe, sources, console)
    model = loading.attach_lora(base, recipe.lora, m.gradient_checkpointing)
    model.train()
    if dist.enabled:
        dist.broadcast_parameters(scoring.trainable_parameters(model))
        torch.manual_seed(t.seed + 1000 * dist.rank)  # own dropout masks per rank
    if dist.sharded:
        sharding.shard(model)
    plan = DataPlan(len(examples), t.batch_size, t.micro_batch_size, t.seed, recipe.data.shuffle, sizes, draws)
    data = StepData(examples, plan, tokenizer.pad_token_id, device, dist.rank, dist.world)
    total = plan.total_steps(t.epochs, t.max_steps)

    def amp() -> Any:
        return scoring.autocast(device, dtype)

    return Run(
        recipe=recipe,
        objective=OBJECTIVES[recipe.objective.kind],
        device=device,
        dtype=dtype,
        tokenizer=tokenizer,
        model=model,
        data=data,
        data_stats=total_stats([s.stats for s in sources]),
        total_steps=total,
        optimizer=build_optimizer(scoring.trainable_parameters(model), t, device, console),
        policy=build_policy(recipe.objective, model, amp, data.batches, total),
        guard=Guard(recipe.guard, total, method_name(recipe.objective)),
        console=console,
        dist=dist,
        scaler=loss_scaler(device, dtype),
        eval_examples=data_in.eval_examples,
        eval_items=data_in.eval_items,
        final_items=data_in.final_items,
        reference=reference_cache(recipe, examples, model, dtype, total > plan.steps_per_epoch, console),
    )


def reference_cache(
    recipe: Recipe, examples: list[Example], model: Any, dtype: torch.dtype, repeats: bool, console: Console
) -> ReferenceCache | None:
    """A cache of the base's distribution (hidden states, or top-k and tail with `objective.reference_top_k`) when the
    objective reads it, the run sees its examples more than once (a cache that is never read is only memory) and it
    fits `objective.reference_cache_mb`; its size is said either way."""
    budget, top_k = recipe.objective.reference_cache_mb, recipe.objective.reference_top_k
    if OBJECTIVES[recipe.objective.kind].kl is None or not budget or not repeats:
        return None
    hidden = scoring.causal_lm(model).config.get_text_config().hidden_size
    size = ReferenceCache.size_bytes(sum(e.n_trained for e in examples), hidden, dtype, top_k)
    what = f"states and top-{top_k} log-probs" if top_k else "states"
    if size > budget * 2**20:
        console.print(
            f"note: the base model's {what} at every trained token would take {size / 2**20:,.0f} MB, more than "
            f"objective.reference_cache_mb = {budget}: the base's forward is recomputed every step. Raise the key "
            "to cache them (every epoch after the first then skips that forward)."
        )
        return None
    console.print(
        f"reference cache: the base model's {what} at every trained token, {size / 2**20:,.1f} MB in host memory "
        "(filled in the first epoch; later epochs skip the base's forward)"
    )
    return ReferenceCache(top_k)
