"""The `psft-lite` command. Thin: parse, call one function per command, turn known errors into one clear message.

Exit codes: 0 success, 1 run failed, 2 bad input (recipe, data, arguments, model). `--debug` shows tracebacks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from psft_lite import __version__
from psft_lite.core.errors import Interrupted, PsftError

app = typer.Typer(
    name="psft-lite",
    help="Fine-tune language models with LoRA/QLoRA using trust-region objectives (Proximal SFT, IDFT, DFT).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
err = Console(stderr=True, soft_wrap=True)
out = out_console = Console(soft_wrap=True)

RecipeArg = Annotated[Path, typer.Argument(help="Recipe TOML file, e.g. recipes/quickstart.toml.", show_default=False)]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--set", "-s", help="Override a recipe key, e.g. --set train.lr=1e-4 (repeatable).", show_default=False
    ),
]


def _version(value: bool) -> None:
    if value:
        out.print(f"psft-lite {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for known errors.")] = False,
) -> None:
    if debug:
        os.environ["PSFT_LITE_DEBUG"] = "1"


@app.command()
def train(
    recipe: RecipeArg,
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run in output.dir.")] = False,
    resume: Annotated[
        Optional[str],
        typer.Option(
            "--resume",
            help="Continue from a checkpoint: `latest` (the default when given alone) or a checkpoint folder.",
            show_default=False,
        ),
    ] = None,
    report_to: Annotated[
        Optional[str],
        typer.Option(
            "--report-to",
            help="Trackers to log to live, comma-separated: tensorboard, wandb, mlflow, trackio (or none); "
            "the same as --set output.report_to=...",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Fine-tune as the recipe says; writes the run directory (adapter/, metrics.jsonl, checkpoints/, recipe.toml).

    Ctrl-C (or SIGTERM) finishes the current step, saves a checkpoint and prints the command to resume.

    [dim]Example: psft-lite train recipes/quickstart.toml --set train.max_steps=20[/dim]
    [dim]Example: psft-lite train runs/quickstart/recipe.toml --resume[/dim]
    """
    from psft_lite import api
    from psft_lite.training.trainer import end_lines

    overrides = (set_ or []) + ([f"output.report_to={report_to}"] if report_to is not None else [])
    result = api.train(recipe, set=overrides, overwrite=overwrite, resume=resume, console=err)
    if not result.main:
        return  # other ranks of a distributed run stay quiet
    notes, where = end_lines(result)
    for line in notes:
        err.print(line)
    for line in where:
        out.print(line, highlight=False)
    if result.gate:  # everything is written; the exit code says "do not ship"
        from psft_lite.core.errors import ForgettingGate

        raise ForgettingGate(result.gate)


@app.command()
def validate(
    recipe: RecipeArg,
    set_: SetOpt = None,
    deep: Annotated[bool, typer.Option("--deep", help="Also load the model and time one training micro-step.")] = False,
    no_preflight: Annotated[
        bool, typer.Option("--no-preflight", help="Only check the recipe's keys and values.")
    ] = False,
) -> None:
    """Check a recipe, then preflight it: the data as the model will see it, and an estimate of peak memory.

    Never downloads: hub models and data sets are checked from the local cache when present.

    [dim]Example: psft-lite validate recipes/quickstart.toml[/dim]
    [dim]Example: psft-lite validate recipes/math.toml --deep[/dim]
    """
    from psft_lite.training.validate import validate as run_validate

    run_validate(recipe, set_ or [], deep=deep, preflight=not no_preflight, out=out, err=err)


ModelArg = Annotated[
    str,
    typer.Argument(
        help="A run directory, an adapter or merged folder, a hub id, a local model folder, or smollm2-135m-instruct.",
        show_default=False,
    ),
]
DtypeOpt = Annotated[
    Optional[str], typer.Option("--dtype", help="bf16, fp16 or fp32 (default: as trained / auto).", show_default=False)
]
DataConfigOpt = Annotated[
    Optional[str],
    typer.Option("--data-config", help="Hub data set configuration, e.g. main for openai/gsm8k.", show_default=False),
]


def _dtype(d: str | None) -> str | None:
    from psft_lite.core.errors import RecipeError

    if d is not None and d not in ("bf16", "fp16", "fp32"):
        raise RecipeError(f"--dtype {d!r}: choose bf16, fp16 or fp32.")
    return d


@app.command()
def generate(
    model: ModelArg,
    prompt: Annotated[
        Optional[list[str]], typer.Option("--prompt", "-p", help="A user message (repeatable).", show_default=False)
    ] = None,
    file: Annotated[
        Optional[Path],
        typer.Option(
            "--file", "-f", help="A .jsonl of {prompt} or {messages} rows; writes JSON lines.", show_default=False
        ),
    ] = None,
    system: Annotated[
        Optional[str], typer.Option("--system", help="System message for --prompt.", show_default=False)
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 256,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 1.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    dtype: DtypeOpt = None,
) -> None:
    """Generate answers with the chat template the run trained with (base model, run dir, or merged folder).

    [dim]Example: psft-lite generate runs/quickstart -p "Tom has 3 apples and buys 4 more. How many does he have?"[/dim]
    """
    import json

    from psft_lite import api
    from psft_lite.core.errors import RecipeError
    from psft_lite.inference.generate import read_prompts

    if bool(prompt) == bool(file):
        raise RecipeError("give either --prompt TEXT (repeatable) or --file prompts.jsonl.")
    prompts = (
        read_prompts(file)
        if file
        else [
            ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
            for p in prompt
        ]
    )
    gens = api.load(model, _dtype(dtype)).generations(prompts, max_new_tokens, temperature, top_p, seed)
    for msgs, g in zip(prompts, gens):
        if file:
            out.print(
                json.dumps({"prompt": msgs[-1]["content"], "generation": g.text, "finished": g.finished}),
                highlight=False,
                soft_wrap=True,
            )
        else:
            out.print(g.text, highlight=False)


@app.command()
def chat(
    model: ModelArg,
    system: Annotated[Optional[str], typer.Option("--system", help="System message.", show_default=False)] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 512,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0)] = 0.7,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 0.95,
    dtype: DtypeOpt = None,
) -> None:
    """Chat with a model or a run interactively (/reset starts over, /exit or Ctrl-D quits).

    [dim]Example: psft-lite chat runs/quickstart --temperature 0[/dim]
    """
    from psft_lite import api

    m = api.load(model, _dtype(dtype))
    err.print(f"chatting with {m.label} — /reset, /exit")
    m.chat(system, max_new_tokens, temperature, top_p, console=err)


@app.command("eval")
def eval_(
    model: ModelArg,
    data: Annotated[
        Optional[list[str]],
        typer.Option(
            "--data",
            "-d",
            help="A data file or NAME=FILE (repeatable). Default: the run's eval sets.",
            show_default=False,
        ),
    ] = None,
    samples: Annotated[
        int, typer.Option("--samples", min=1, help="k answers per problem (avg@k); needs --temperature > 0.")
    ] = 1,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0)] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 1.0,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 16,
    limit: Annotated[
        Optional[int], typer.Option("--limit", min=1, help="Only the first N problems of each set.", show_default=False)
    ] = None,
    out_dir: Annotated[
        Optional[Path], typer.Option("--out", help="Write summary.json and predictions.jsonl here.", show_default=False)
    ] = None,
    data_config: DataConfigOpt = None,
    split: Annotated[
        str, typer.Option("--split", help="Split of hub data sets and data set folders given with --data.")
    ] = "test",
    dtype: DtypeOpt = None,
    tasks: Annotated[
        Optional[str],
        typer.Option(
            "--tasks",
            help="lm-evaluation-harness tasks instead of --data, comma-separated (gsm8k,arc_easy,...); "
            "needs pip install 'psft-lite[harness]'.",
            show_default=False,
        ),
    ] = None,
    num_fewshot: Annotated[
        Optional[int],
        typer.Option("--num-fewshot", min=0, help="With --tasks: few-shot examples per prompt.", show_default=False),
    ] = None,
    include_path: Annotated[
        Optional[list[Path]],
        typer.Option(
            "--include-path",
            help="With --tasks: a folder of your own task YAML files (repeatable).",
            show_default=False,
        ),
    ] = None,
    compare_base: Annotated[
        bool,
        typer.Option(
            "--compare-base", help="With --tasks: also evaluate the base (adapter off); print the difference."
        ),
    ] = False,
    chat_template: Annotated[
        Optional[bool],
        typer.Option(
            "--chat-template/--no-chat-template",
            help="With --tasks: wrap prompts in the chat template the run trained with (default: when the tokenizer "
            "has one); --no-chat-template for base-model tasks.",
            show_default=False,
        ),
    ] = None,
    retention: Annotated[
        bool,
        typer.Option(
            "--retention",
            help="The general-ability verdict: the shipped suite of 1,210 checkable items scored by the model and by "
            "its base (adapter off), compared item by item; a plain model is compared with itself.",
        ),
    ] = False,
    per_kind: Annotated[bool, typer.Option("--per-kind", help="With --retention: a line per kind of item.")] = False,
    retention_kinds: Annotated[
        Optional[str],
        typer.Option(
            "--retention-kinds",
            help="With --retention: score only these kinds of item, comma-separated (e.g. "
            "fact,category,opposite,word_form,commonsense,science,word_knowledge, the multiple-choice ones, for a "
            "base model that does not answer a chat; default: a run's eval.retention_kinds, else every item).",
            show_default=False,
        ),
    ] = None,
    max_forgetting: Annotated[
        Optional[float],
        typer.Option(
            "--max-forgetting",
            min=0.0,
            help="With --retention: exit 3 when general ability fell by more than POINTS with 95 % confidence (the "
            "whole interval of the change below -POINTS).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Math-answer accuracy (#### N and \\boxed{} answers), generation entropy and reference NLL per data set; with
    --retention, what the model can still do; or, with --tasks, standard benchmarks through lm-evaluation-harness.

    [dim]Example: psft-lite eval runs/quickstart -d in_domain=data/arith/test.jsonl -d ood=data/arith/ood.jsonl[/dim]
    [dim]Example: psft-lite eval runs/quickstart --retention --max-forgetting 2[/dim]
    [dim]Example: psft-lite eval runs/quickstart --tasks arith_test --include-path recipes/harness --compare-base[/dim]
    """
    from psft_lite.core.errors import RecipeError

    harness_only = num_fewshot is not None or include_path or compare_base or chat_template is not None
    if tasks is not None and data:
        raise RecipeError("give --data (your own data) or --tasks (harness tasks), not both, in one eval.")
    if tasks is not None:
        _harness(
            model, tasks, out_dir, limit, num_fewshot, include_path, chat_template, compare_base, batch_size, dtype
        )
        return
    if harness_only:
        raise RecipeError("--num-fewshot, --include-path, --compare-base and --chat-template go with --tasks.")
    if (per_kind or max_forgetting is not None or retention_kinds) and not retention:
        raise RecipeError("--per-kind, --retention-kinds and --max-forgetting go with --retention.")
    from psft_lite import api
    from psft_lite.core.errors import ForgettingGate

    ev = api.evaluate(
        model,
        data,
        retention=retention,
        retention_kinds=[k.strip() for k in retention_kinds.split(",") if k.strip()] if retention_kinds else None,
        limit=limit,
        max_new_tokens=max_new_tokens,
        samples=samples,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
        split=split,
        data_config=data_config,
        dtype=_dtype(dtype),
        console=err,
    )
    for line in ev.lines(per_kind):
        out.print(line, highlight=False)
    if out_dir is not None:
        out.print("wrote " + " and ".join(map(str, ev.write(out_dir))))
    if ev.gate(max_forgetting):
        raise ForgettingGate(ev.gate(max_forgetting))


def _harness(
    model: str,
    tasks: str,
    out_dir: Path | None,
    limit: int | None,
    num_fewshot: int | None,
    include_path: list[Path] | None,
    chat: bool | None,
    compare_base: bool,
    batch_size: int,
    dtype: str | None,
) -> None:
    from psft_lite.inference import harness

    names = harness.parse_tasks(tasks)
    kw = dict(out_dir=out_dir, limit=limit, num_fewshot=num_fewshot, include_path=include_path or [], chat=chat)
    report = harness.run(
        model, names, **kw, compare_base=compare_base, batch_size=batch_size, dtype=_dtype(dtype), console=err
    )
    table, note, files = harness.report_lines(report)
    out.print(table, highlight=False, markup=False)
    err.print(note)
    for line in files:
        out.print(line, highlight=False)


@app.command()
def ddt(
    model: ModelArg,
    data: Annotated[
        str,
        typer.Option(
            "--data", "-d", help="Data file (any supported format), or a hub data set id.", show_default=False
        ),
    ],
    limit: Annotated[
        Optional[int], typer.Option("--limit", min=1, help="Only the first N rows.", show_default=False)
    ] = None,
    max_length: Annotated[int, typer.Option("--max-length", min=2, help="Truncate longer examples.")] = 4096,
    as_json: Annotated[bool, typer.Option("--json", help="Print the statistics as JSON.")] = False,
    data_config: DataConfigOpt = None,
    split: Annotated[str, typer.Option("--split", help="Split of a hub data set or data set folder.")] = "train",
    dtype: DtypeOpt = None,
) -> None:
    """How in-distribution a data set is for a model: φ = log p + H per response token (docs/METHODS.md §3).

    [dim]Example: psft-lite ddt smollm2-135m-instruct --data data/arith/train.jsonl --limit 200[/dim]
    """
    import json

    from psft_lite import api

    result = api.ddt(
        model, data, limit=limit, max_length=max_length, data_config=data_config, split=split, dtype=_dtype(dtype)
    )
    if as_json:
        out.print(json.dumps(result.as_dict()), highlight=False, soft_wrap=True)
        return
    for line in result.lines():
        out.print(line, highlight=False)


@app.command()
def hint(
    model: ModelArg,
    data: Annotated[
        str,
        typer.Option(
            "--data", "-d", help="Problems with reference solutions (any training format).", show_default=False
        ),
    ],
    out_file: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Output .jsonl (kept rewrites); dropped ones go to OUT.dropped.jsonl.",
            show_default=False,
        ),
    ],
    fmt: Annotated[str, typer.Option("--format", help="Data format (as data.format).")] = "auto",
    beta: Annotated[
        float, typer.Option("--beta", min=0.0, help="λ = clamp(β·H(p)/ln|V|, 0, 1); 0 = the hinted stream alone.")
    ] = 3.0,
    answer_marker: Annotated[
        str, typer.Option("--answer-marker", help="After this text the plain stream decodes alone.")
    ] = "####",
    temperature: Annotated[float, typer.Option("--temperature", min=0.0)] = 0.3,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 0.95,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 8192,
    keep: Annotated[
        str,
        typer.Option(
            "--keep",
            help="correct: keep rewrites that finished (end-of-turn) with the reference's answer; all: keep every "
            "rewrite.",
        ),
    ] = "correct",
    min_phi: Annotated[
        Optional[float],
        typer.Option("--min-phi", help="Also drop rewrites whose mean φ is below this.", show_default=False),
    ] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    data_config: DataConfigOpt = None,
    split: Annotated[str, typer.Option("--split", help="Split of a hub data set or data set folder.")] = "train",
    cot_fallback: Annotated[
        bool,
        typer.Option(
            "--cot-fallback",
            help="When the analysis has no '# CoT' heading, append one instead of dropping the example (small "
            "models rarely write it).",
        ),
    ] = False,
    dtype: DtypeOpt = None,
) -> None:
    """Hinted Decoding: rewrite (problem, solution) pairs in the model's own words, guided by the reference.

    Resumable: rerun with the same --out to continue; finished examples are skipped.

    [dim]Example: psft-lite hint smollm2-135m-instruct -d data/arith/train.jsonl -o runs/hinted.jsonl --limit 30[/dim]
    """
    from psft_lite import api

    result = api.hint(
        model,
        data,
        out_file,
        format=fmt,
        beta=beta,
        answer_marker=answer_marker,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        keep=keep,
        min_phi=min_phi,
        limit=limit,
        seed=seed,
        cot_fallback=cot_fallback,
        data_config=data_config,
        split=split,
        dtype=_dtype(dtype),
        console=err,
    )
    for line in result.lines():
        out.print(line)


@app.command()
def study(
    recipe: RecipeArg,
    set_: SetOpt = None,
    methods: Annotated[
        str, typer.Option("--methods", help="Comma-separated methods.")
    ] = "sft,dft,psft-snapshot,psft-base,idft",
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated seeds.")] = "0,1",
    out_dir: Annotated[
        Optional[Path],
        typer.Option("--out", help="Study folder. Default: the recipe's output.dir.", show_default=False),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Problems per eval set.")] = 100,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 128,
    report: Annotated[
        Optional[Path],
        typer.Option(
            "--report", help="Write tables.md and PNG figures here (default: the study folder).", show_default=False
        ),
    ] = None,
    sweep: Annotated[
        Optional[list[str]],
        typer.Option(
            "--sweep",
            help="Also vary recipe keys: KEY=V1,V2,... (repeatable; a grid). Keys joined by ':' move together: "
            "train.lr:train.epochs=1e-4:12,1e-3:4.",
            show_default=False,
        ),
    ] = None,
    eval_every: Annotated[
        int, typer.Option("--eval-every", min=1, help="Evaluate every N epochs (and always the last).")
    ] = 1,
    no_base: Annotated[
        bool, typer.Option("--no-base", help="Do not evaluate the base model (another process or unit does).")
    ] = False,
) -> None:
    """Train every objective for several epochs and seeds on one recipe, evaluate each epoch end (and the steps
    train.save_at names), report. `--methods base` evaluates only the base model.

    With --sweep, every method runs at every point of a grid of recipe values (keys a method does not read, such as
    objective.refresh_every for sft, are not crossed with it). Resumable: rerun the same command to continue;
    processes may share one study folder (one per --seeds value). Runs on a real model with --set model.name=...

    [dim]Example: psft-lite study recipes/study/arith.toml[/dim]
    [dim]Example: psft-lite study recipes/study/arith.toml --methods sft,psft-base --sweep train.lr=3e-4,1e-3[/dim]
    """
    from psft_lite.recipe.schema import load_recipe
    from psft_lite.study.runner import study as run_study

    parsed = load_recipe(recipe, set_ or [])
    results, tables, pngs = run_study(
        parsed, methods, seeds, out_dir, limit, max_new_tokens, report, sweep or [], eval_every, err, not no_base
    )
    out.print(f"results: {results}\ntables: {tables}\nfigures: {', '.join(map(str, pngs))}")


@app.command()
def plot(
    runs: Annotated[list[Path], typer.Argument(help="Run directories to overlay.", show_default=False)],
    out_file: Annotated[Path, typer.Option("--out", "-o", help="PNG file to write.")] = Path("plot.png"),
    smooth: Annotated[int, typer.Option("--smooth", min=1, help="Moving average over N steps.")] = 1,
) -> None:
    """PNG figures of loss, entropy, clip fraction, KL and eval accuracy against step, runs overlaid.

    Needs matplotlib: pip install 'psft-lite[plot]'.

    [dim]Example: psft-lite plot runs/sft runs/psft --out sft-vs-psft.png[/dim]
    """
    from psft_lite.study.plot import plot_runs

    report = plot_runs(runs, out_file, smooth)
    out.print(f"wrote {report['out']}")


@app.command()
def merge(
    source: Annotated[
        Path,
        typer.Argument(help="Run directory, its adapter/ folder, or a checkpoints/step-N folder.", show_default=False),
    ],
    out: Annotated[
        Optional[Path], typer.Option("--out", help="Output folder. Default: RUN_DIR/merged.", show_default=False)
    ] = None,
    base: Annotated[
        Optional[str],
        typer.Option("--base", help="Base model to merge into, if not the one trained on.", show_default=False),
    ] = None,
    dtype: Annotated[
        Optional[str],
        typer.Option("--dtype", help="bf16, fp16 or fp32. Default: the training precision.", show_default=False),
    ] = None,
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="Skip the logits check against the adapter model.")
    ] = False,
    from_original: Annotated[
        bool,
        typer.Option(
            "--from-original",
            help="Merge into the original full-precision weights instead of the dequantized 4-bit ones (differs "
            "from what was trained).",
        ),
    ] = False,
) -> None:
    """Fold the adapter into its base and write a plain transformers model folder; checks its logits match.

    [dim]Example: psft-lite merge runs/quickstart --out models/quickstart-merged[/dim]
    """
    from psft_lite import api

    merged = api.merge(
        source, out, base=base, dtype=_dtype(dtype), verify=not no_verify, from_original=from_original, console=err
    )
    out_console.print(f"merged: {merged.path}")


@app.command()
def export(
    source: Annotated[
        Path,
        typer.Argument(
            help="Run directory, its adapter/ or a checkpoints/step-N folder, or a model folder (e.g. RUN/merged).",
            show_default=False,
        ),
    ],
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            help="GGUF file to write (several quant types: NAME-<quant>.gguf beside it). Default: RUN/gguf/.",
            show_default=False,
        ),
    ] = None,
    quant: Annotated[
        str,
        typer.Option(
            "--quant", help="f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m or q6_k; a comma list writes several."
        ),
    ] = "q8_0",
    adapter_only: Annotated[
        bool,
        typer.Option(
            "--adapter-only", help="Write the LoRA adapter as a llama.cpp LoRA GGUF (llama.cpp --lora, Ollama ADAPTER)."
        ),
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")] = False,
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="Skip the check in llama.cpp (tokenizer, logits, end-of-turn).")
    ] = False,
) -> None:
    """Write the fine-tune as GGUF for llama.cpp, Ollama and LM Studio, with a Modelfile and a model card; checks in
    llama.cpp that it tokenizes and computes like the merged model.

    [dim]Example: psft-lite export runs/quickstart --quant q8_0,q4_k_m[/dim]
    """
    from psft_lite import api

    result = api.export(
        source, out, quant=quant, adapter_only=adapter_only, overwrite=overwrite, verify=not no_verify, console=err
    )
    for path in result.files:
        out_console.print(f"gguf: {path}")


@app.command("env")
def env_(
    as_json: Annotated[bool, typer.Option("--json", help="Print the facts as JSON instead of markdown.")] = False,
) -> None:
    """Versions, hardware and whether 4-bit works here, as a markdown block to paste into a bug report.

    Always exits 0; anything missing is said. Token values are never printed.

    [dim]Example: psft-lite env[/dim]
    """
    import json

    from psft_lite.model.environment import collect, markdown

    info = collect()
    out.print(json.dumps(info, indent=2) if as_json else markdown(info), highlight=False, soft_wrap=True)


def _default_resume(argv: list[str]) -> None:
    """`--resume` given alone means `--resume latest` (click options cannot have an optional value)."""
    for i, arg in enumerate(argv):
        if arg == "--resume":
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or nxt.startswith("-") or nxt.endswith(".toml"):
                argv.insert(i + 1, "latest")
            return


def main() -> None:
    """Entry point: run the app, mapping known errors to one paragraph and an exit code."""
    debug = "--debug" in sys.argv or os.environ.get("PSFT_LITE_DEBUG") == "1"
    _default_resume(sys.argv)
    try:
        app()  # standalone: usage errors exit 2 with click's message
    except PsftError as e:
        if debug:
            raise
        label = "[bold yellow]stopped:[/bold yellow]" if isinstance(e, Interrupted) else "[bold red]error:[/bold red]"
        err.print(f"{label} {escape(str(e))}", highlight=False, soft_wrap=True)  # `[wandb]` is text, not markup
        sys.exit(e.exit_code)


if __name__ == "__main__":  # pragma: no cover
    main()
