"""psft-lite from Python: the functions `psft-lite`'s commands are built on.

    import psft_lite

    run = psft_lite.train("recipes/quickstart.toml", train={"max_steps": 20}, output={"dir": "runs/nb"})
    print(run.final_eval["general_ability"]["overall"])            # the verdict, as numbers
    model = psft_lite.load(run.run_dir)
    print(model.generate("Anna has 12 stickers and gives 5 to Ben. How many does she have left?"))
    ev = psft_lite.evaluate(run.run_dir, data={"test": "data/arith/test.jsonl"}, limit=20, retention=True)
    merged = psft_lite.merge(run.run_dir)
    gguf = psft_lite.export(run.run_dir, quant="q8_0")

Every function takes a run directory, an adapter or merged folder, a hub id, a local model folder or the embedded
`smollm2-135m-instruct` where the CLI does; returns a dataclass; raises the `psft_lite.core.errors` types (a
`PsftError` says in one paragraph what is wrong and what to do); shows a rich progress display on stderr (in a
notebook too) unless `progress=False`; and leaves the process's logging and warning settings as it found them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Nothing heavy at import time: torch, transformers and peft load inside the functions.


@contextlib.contextmanager
def _library_call() -> Iterator[None]:
    """Run psft-lite's work with transformers' and datasets' chatter quieted, then put their verbosity, progress bars
    and the warning filters back: a library call changes no global state."""
    import warnings

    import transformers

    t_log = transformers.utils.logging
    before = (t_log.get_verbosity(), t_log.is_progress_bar_enabled())
    try:
        import datasets

        d_before: tuple[int, bool] | None = (
            datasets.utils.logging.get_verbosity(),
            datasets.utils.is_progress_bar_enabled(),
        )
    except ImportError:  # pragma: no cover
        datasets, d_before = None, None
    try:
        with warnings.catch_warnings():
            yield
    finally:
        t_log.set_verbosity(before[0])
        (t_log.enable_progress_bar if before[1] else t_log.disable_progress_bar)()
        if datasets is not None and d_before is not None:
            datasets.utils.logging.set_verbosity(d_before[0])
            (datasets.enable_progress_bars if d_before[1] else datasets.disable_progress_bars)()


def _console(progress: bool, console: Any = None) -> Any:
    """Where progress goes: the caller's rich Console, stderr, or nowhere."""
    from rich.console import Console

    if console is not None:
        return console
    return Console(stderr=True) if progress else Console(quiet=True)


# ---------------------------------------------------------------------------------------------------------------------
# Recipes


def make_recipe(source: Any = None, set: list[str] | tuple[str, ...] = (), **sections: dict[str, Any]) -> Any:  # noqa: A002
    """A validated `Recipe` from a TOML file (`source` a path), a dict, an existing Recipe, or nothing (the defaults),
    with sections overridden in Python (`train={"lr": 1e-4}`) and/or `--set`-style strings (`set=["train.lr=1e-4"]`).
    A bad key or value raises `RecipeError`, as the CLI does."""
    from psft_lite.recipe.schema import Recipe, _apply_override, load_recipe, recipe_from_dict

    if isinstance(source, (str, Path)):
        base = load_recipe(source, list(set))
        if not sections:
            return base
        raw, path = base.model_dump(mode="json", exclude_none=True), base.path
    else:
        raw = source.model_dump(mode="json", exclude_none=True) if isinstance(source, Recipe) else dict(source or {})
        path = source.path if isinstance(source, Recipe) else None
        for item in set:
            _apply_override(raw, item)
    for name, values in sections.items():
        if not isinstance(values, dict):
            raise TypeError(f"recipe section {name!r} must be a dict of keys, e.g. {name}={{'key': value}}")
        raw[name] = {**raw.get(name, {}), **values} if isinstance(raw.get(name), dict) else dict(values)
    out = recipe_from_dict(raw, source=str(path or "recipe"))
    out._path = path
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Train


def train(
    source: Any,
    *,
    overwrite: bool = False,
    resume: str | None = None,
    progress: bool = True,
    console: Any = None,
    set: list[str] | tuple[str, ...] = (),  # noqa: A002
    **sections: dict[str, Any],
) -> Any:
    """Fine-tune as the recipe says; returns a `TrainResult` (run_dir, adapter, metrics, final evaluation and
    verdict, gate, outputs). `source` is a recipe path, dict or Recipe; `sections` and `set` override it (see
    `make_recipe`). `resume="latest"` continues an interrupted run; a run stopped by Ctrl-C raises `Interrupted`."""
    from psft_lite.training import trainer

    with _library_call():
        return trainer.run(
            make_recipe(source, set, **sections),
            console=_console(progress, console),
            overwrite=overwrite,
            resume=resume,
        )


# ---------------------------------------------------------------------------------------------------------------------
# A model you can generate with


@dataclass
class Model:
    """A model loaded as `psft-lite generate` loads it: a run is its base (4-bit or not, as trained) with its adapter
    and the chat template it trained with."""

    loaded: Any

    @property
    def label(self) -> str:
        return self.loaded.label

    def generate(
        self, prompts: Any, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0
    ) -> Any:
        """Answer one prompt (a string → a string) or many (a list of strings or of message lists → a list), greedy
        unless `temperature` > 0."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict))
        items = [prompts] if single else list(prompts)
        chats = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in items]
        texts = [g.text for g in self.generations(chats, max_new_tokens, temperature, top_p, seed)]
        return texts[0] if single else texts

    def generations(
        self,
        chats: list[list[dict]],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> list[Any]:
        """The full records for message lists: each answer's text, token count, whether it ended its turn (rather
        than hitting `max_new_tokens`) and its mean entropy."""
        from psft_lite.inference.generate import generate

        with _library_call():
            return generate(self.loaded, chats, max_new_tokens, temperature, top_p, seed=seed)

    def chat(
        self,
        system: str | None = None,
        max_new_tokens: int = 512,
        temperature: float = 0.7,
        top_p: float = 0.95,
        console: Any = None,
    ) -> None:
        """An interactive chat on standard input (/reset starts over, /exit or end of input quits)."""
        from psft_lite.inference.generate import chat_loop

        chat_loop(self.loaded, system, max_new_tokens, temperature, top_p, console=_console(True, console))


def load(model: str | Path, dtype: str | None = None, device: str = "auto") -> Model:
    """Load a run, adapter, merged folder, hub id, local model folder or `smollm2-135m-instruct` for generation."""
    from psft_lite.inference.generate import load_model

    with _library_call():
        return Model(load_model(model, dtype, device))


# ---------------------------------------------------------------------------------------------------------------------
# Evaluate


@dataclass
class SetScore:
    """One data set's scores (`psft-lite eval --data`)."""

    n: int
    accuracy: float
    mean_entropy: float
    finished: float
    mean_nll: float | None = None
    format_rate: float | None = None
    answer_accuracy: float | None = None
    predictions: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Evaluation:
    """What `evaluate` measured: per data set its scores, and with `retention` the general-ability verdict (a
    `psft_lite.inference.retention.Verdict`: overall and per-kind change with intervals, right→wrong counts, KL)."""

    sets: dict[str, SetScore]
    general_ability: Any = None
    samples: int = 1

    @property
    def verdict(self) -> str | None:
        """The one-line verdict `psft-lite eval --retention` prints."""
        from psft_lite.inference.retention import verdict_line

        return verdict_line(self.general_ability) if self.general_ability is not None else None

    def lines(self, per_kind: bool = False) -> list[str]:
        """What `psft-lite eval` prints: a line per set, then the verdict (and a line per kind) and the KL."""
        from psft_lite.inference.evaluate import summary_lines
        from psft_lite.inference.retention import report_lines

        summaries = {k: {f: v for f, v in vars(s).items() if v is not None} for k, s in self.sets.items()}
        out = summary_lines(summaries, self.samples)
        return out + (report_lines(self.general_ability, per_kind) if self.general_ability is not None else [])

    def write(self, folder: str | Path) -> list[Path]:
        """summary.json and predictions.jsonl (the sets), retention.json and retention-items.jsonl (the verdict)."""
        from psft_lite.inference.evaluate import write_outputs
        from psft_lite.inference.retention import write_verdict

        folder, written = Path(folder), []
        if self.sets:
            summaries = {
                k: {f: v for f, v in vars(s).items() if v is not None and f != "predictions"}
                for k, s in self.sets.items()
            }
            write_outputs(folder, summaries, {k: s.predictions for k, s in self.sets.items()})
            written += [folder / "summary.json", folder / "predictions.jsonl"]
        if self.general_ability is not None:
            write_verdict(folder, self.general_ability)
            written += [folder / "retention.json", folder / "retention-items.jsonl"]
        return written

    def gate(self, max_forgetting: float | None) -> str | None:
        """Why the model fails `max_forgetting` (a drop beyond it with 95 % confidence), or None."""
        from psft_lite.inference.retention import gate

        return gate(self.general_ability, max_forgetting) if self.general_ability is not None else None


def evaluate(
    model: str | Path | Model,
    data: dict[str, str] | list[str] | None = None,
    *,
    retention: bool = False,
    retention_kinds: list[str] | None = None,
    limit: int | None = None,
    max_new_tokens: int = 256,
    samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    split: str = "test",
    data_config: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
    console: Any = None,
) -> Evaluation:
    """Score a model on named data sets (`{"name": "file.jsonl"}` or `["name=file.jsonl", "other.jsonl"]`; a run
    without `data` uses its recipe's eval sets) and, with `retention`, give the general-ability verdict against its
    base, on the suite's `retention_kinds` (None: a run's `eval.retention_kinds`, else every item). A bad file or
    option raises `RecipeError`/`DataError` before any generation."""
    from psft_lite.core.errors import RecipeError
    from psft_lite.inference import evaluate as ev
    from psft_lite.inference import retention as ret
    from psft_lite.inference.generate import load_model

    if samples > 1 and temperature == 0:
        raise RecipeError(
            "--samples > 1 needs --temperature > 0 (samples=1 unless temperature > 0: greedy answers are identical)."
        )
    console = _console(progress, console)
    with _library_call():
        items = ret.load_suite(kinds=retention_kinds) if retention and retention_kinds else None
        loaded = model.loaded if isinstance(model, Model) else load_model(model, dtype)
        if retention and items is None and loaded.recipe is not None and loaded.recipe.eval.retention_kinds:
            items = ret.load_suite(kinds=loaded.recipe.eval.retention_kinds)
        named = [f"{k}={v}" for k, v in data.items()] if isinstance(data, dict) else data
        sets = ev.named_sets(loaded, named, data_config, split, limit) if named or not retention else {}
        scores: dict[str, SetScore] = {}
        if sets:
            kw = dict(
                samples=samples,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
            )
            summaries, predictions = ev.evaluate_sets(loaded, sets, **kw, console=console)
            for name, s in summaries.items():
                keep = {k: s.get(k) for k in SetScore.__dataclass_fields__ if k != "predictions" and k in s}
                scores[name] = SetScore(**keep, predictions=predictions[name])
        verdict = (
            ret.evaluate_retention(loaded, items, console=console, taught=_taught(loaded, sets)) if retention else None
        )
    return Evaluation(scores, verdict, samples)


def _taught(loaded: Any, sets: dict[str, Any]) -> list[str]:
    """The formats a model was taught, as its eval sets state them: the sets scored, else its run's recipe sets (a
    run whose eval files are gone has none to state)."""
    from psft_lite.core.errors import DataError
    from psft_lite.inference import evaluate as ev

    if not sets and loaded.recipe is not None and ev.recipe_sets(loaded.recipe):
        try:
            sets = ev.recipe_eval_items(loaded.recipe)
        except DataError:
            return []
    return ev.taught_openings(sets)


# ---------------------------------------------------------------------------------------------------------------------
# Merge and export


@dataclass
class MergeResult:
    """A merged model folder and its check against the adapter model (max |Δlogit|, greedy agreement, tolerance)."""

    path: Path
    check: dict[str, Any]


def merge(
    run: str | Path,
    out: str | Path | None = None,
    *,
    dtype: str | None = None,
    base: str | None = None,
    verify: bool = True,
    from_original: bool = False,
    progress: bool = True,
    console: Any = None,
) -> MergeResult:
    """Fold a run's adapter into its base (dequantizing a 4-bit base first) and write a plain transformers folder;
    checks its logits against the adapter model (a failure raises `RunError` and leaves nothing at `out`)."""
    from psft_lite.exporting.merge import merge as do_merge

    with _library_call():
        report = do_merge(
            Path(run),
            out=Path(out) if out else None,
            base=base,
            dtype=dtype,
            verify=verify,
            from_original=from_original,
            console=_console(progress, console),
        )
    return MergeResult(Path(report["out"]), {k: v for k, v in report.items() if k != "out"})


@dataclass
class ExportResult:
    """GGUF files, each with its check in llama.cpp, and the Modelfile and model card beside them."""

    files: list[Path]
    checks: list[dict[str, Any]]
    report: dict[str, Any]


def export(
    run: str | Path,
    out: str | Path | None = None,
    *,
    quant: str = "q8_0",
    adapter_only: bool = False,
    overwrite: bool = False,
    verify: bool = True,
    progress: bool = True,
    console: Any = None,
) -> ExportResult:
    """Write a run (or model folder) as GGUF for llama.cpp, Ollama and LM Studio, proved in llama.cpp."""
    from psft_lite.exporting.gguf import export as do_export

    with _library_call():
        report = do_export(
            Path(run),
            out=Path(out) if out else None,
            quant=quant,
            adapter_only=adapter_only,
            overwrite=overwrite,
            verify=verify,
            console=_console(progress, console),
        )
    return ExportResult([Path(f["path"]) for f in report["files"]], list(report["files"]), report)


# ---------------------------------------------------------------------------------------------------------------------
# Data diagnostics and rewriting


def _source(data: str | Path, data_config: str | None, split: str) -> Any:
    from psft_lite.recipe.schema import Source

    return Source(path=str(data), config=data_config, split=split)


@dataclass
class Distribution:
    """`ddt`'s answer: how in-distribution a data set's responses are for a model — φ = log p + H per response token
    (mean over tokens and over sequences, shares above thresholds, a histogram over `edges`) and the verdict."""

    model: str
    data: str
    examples: int
    tokens: int
    mean_phi: float
    mean_phi_per_sequence: float
    std_phi: float
    shares: dict[str, float]  # "> 0", "> -1", "> -3", "> -5": share of tokens with φ above
    edges: list[float]
    counts: list[int]
    verdict: str

    def as_dict(self) -> dict[str, Any]:
        """The statistics as `psft-lite ddt --json` prints them."""
        return {
            "examples": self.examples,
            "tokens": self.tokens,
            "mean_phi": self.mean_phi,
            "mean_phi_per_sequence": self.mean_phi_per_sequence,
            "std_phi": self.std_phi,
            **{f"share_phi_gt_{k[2:]}": v for k, v in self.shares.items()},
            "histogram": {"edges": self.edges, "counts": self.counts},
            "verdict": self.verdict,
            "model": self.model,
            "data": self.data,
        }

    def lines(self) -> list[str]:
        from psft_lite.inference.ddt import report_lines

        return report_lines(self.as_dict(), self.model, self.data)


def ddt(
    model: str | Path | Model,
    data: str | Path,
    *,
    limit: int | None = None,
    max_length: int = 4096,
    data_config: str | None = None,
    split: str = "train",
    dtype: str | None = None,
) -> Distribution:
    """How in-distribution `data` is for `model` (docs/METHODS.md §3): one teacher-forced pass over every response.
    The data are read and checked before the model loads (a bad file raises `DataError` naming its line)."""
    from psft_lite.core.errors import DataError
    from psft_lite.data import encode_conversations, load_conversations
    from psft_lite.inference.ddt import summarize, token_phi
    from psft_lite.inference.generate import load_model
    from psft_lite.recipe.schema import RowFormat

    rows, source = RowFormat(max_length=max_length, truncation="truncate"), _source(data, data_config, split)
    conversations = load_conversations(source, rows, limit=limit)  # every row read and checked, before the model
    with _library_call():
        loaded = model.loaded if isinstance(model, Model) else load_model(model, dtype)
        examples, _ = encode_conversations(conversations, source, rows, loaded.tokenizer)
        s = summarize(token_phi(loaded.model, examples, loaded.tokenizer.pad_token_id, loaded.device, loaded.dtype))
    if not s["tokens"]:
        raise DataError(f"{data}: no response tokens to score (every example's response is empty).")
    shares = {f"> {k}": s[f"share_phi_gt_{k}"] for k in ("0", "-1", "-3", "-5")}
    keep = ("examples", "tokens", "mean_phi", "mean_phi_per_sequence", "std_phi", "verdict")
    hist = s["histogram"]
    name = model.label if isinstance(model, Model) else str(model)
    return Distribution(
        name, str(data), **{k: s[k] for k in keep}, shares=shares, edges=hist["edges"], counts=hist["counts"]
    )


@dataclass
class HintResult:
    """`hint`'s answer: what was kept (`out`) and dropped (`dropped_file`) and why, over every example of the data
    written so far (a resumed rewrite reports all), with the rewrites' answer accuracy and mean φ."""

    out: Path
    dropped_file: Path
    summary: dict[str, Any]

    @property
    def kept(self) -> int:
        return int(self.summary["kept"])

    def lines(self) -> list[str]:
        from psft_lite.inference.hinted import summary_lines

        return summary_lines(self.summary)


def hint(
    model: str | Path | Model,
    data: str | Path,
    out: str | Path,
    *,
    format: str = "auto",  # noqa: A002
    beta: float = 3.0,
    answer_marker: str = "####",
    temperature: float = 0.3,
    top_p: float = 0.95,
    max_new_tokens: int = 8192,
    keep: str = "correct",
    min_phi: float | None = None,
    limit: int | None = None,
    seed: int = 0,
    cot_fallback: bool = False,
    data_config: str | None = None,
    split: str = "train",
    dtype: str | None = None,
    progress: bool = True,
    console: Any = None,
) -> HintResult:
    """Hinted Decoding: rewrite (problem, solution) pairs in the model's own words, guided by the reference
    (docs/METHODS.md). Resumable: the same `out` continues where it stopped. Options and data are checked before the
    model loads (`RecipeError` / `DataError`)."""
    from psft_lite.core.errors import RecipeError
    from psft_lite.data import load_conversations
    from psft_lite.inference.generate import load_model
    from psft_lite.inference.hinted import HintConfig, run
    from psft_lite.recipe.schema import FORMATS, RowFormat

    if format not in FORMATS:
        raise RecipeError(f"--format {format!r}: choose one of {', '.join(FORMATS)}.")
    if keep not in ("correct", "all"):
        raise RecipeError(f"--keep {keep!r}: choose correct or all.")
    cfg = HintConfig(
        beta=beta, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, answer_marker=answer_marker
    )
    cfg.seed, cfg.cot_fallback = seed, cot_fallback
    row_format, source = RowFormat(format=format), _source(data, data_config, split)
    # every row readable, before the model
    rows = [row for _, row in load_conversations(source, row_format, limit=limit)]
    with _library_call():
        loaded = model.loaded if isinstance(model, Model) else load_model(model, dtype)
        summary = run(loaded, rows, row_format, Path(out), cfg, keep, min_phi, console=_console(progress, console))
    return HintResult(Path(summary["out"]), Path(summary["dropped_file"]), summary)


# ---------------------------------------------------------------------------------------------------------------------
# Extension


def register_objective(name: str, loss: Any, **row: Any) -> None:
    """Add an objective to the table every part of psft-lite reads (the recipe's `objective.kind`, the training step,
    the guard, `plot`, `study`): `loss(logp, *, mask, weights, **inputs, **params) -> (loss, stats)` and the row's
    fields (`label`, `inputs`, `params`, `keys`, `stats`, ...; psft_lite.training.objectives.Objective). Checked like
    a built-in one: a bad name, an unknown input or a parameter the recipe has no key for raises `ValueError`."""
    from psft_lite.recipe.schema import ObjectiveSection
    from psft_lite.training.objectives import register

    keys = {*row.get("params", ()), *row.get("keys", ()), *([row["topk_key"]] if row.get("topk_key") else [])}
    unknown = sorted(keys - set(ObjectiveSection.model_fields))
    if unknown:
        raise ValueError(
            f"objective {name!r}: objective.{unknown[0]} is not a recipe key; parameters come from [objective] keys "
            f"({', '.join(sorted(ObjectiveSection.model_fields))})"
        )
    register(name, loss, **row)


def register_output(name: str, write: Any, check: Any = None) -> None:
    """Add an output format `output.save` (and `psft-lite train`) then accepts: `write(run_dir, output_section,
    console) -> summary dict`, called at the end of a run after the adapter is written, and optionally `check(where)`,
    called before training, which raises when the format cannot be written on this machine. A bad name or a
    non-callable raises `ValueError`."""
    from psft_lite.exporting.outputs import register

    register(name, write, check)


def register_tracker(backend: Any) -> None:
    """Add a tracker `output.report_to` then accepts: a class with `name`, `module` (the package it needs, "" for
    none), `extra`, `replays_resumed_steps` and the calls `open`, `where`, `start`, `scalars`, `text`, `finish`
    (psft_lite.tracking.trackers.base.Backend). It gets every metrics.jsonl record live, as the built-in ones do. A
    class missing any of them raises `ValueError` naming what."""
    from psft_lite.tracking.trackers import register

    register(backend)
