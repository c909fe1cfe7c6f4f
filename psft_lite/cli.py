"""The `psft-lite` command. Thin: parse, call one function per command, turn known errors into one clear message.

Exit codes: 0 success, 1 run failed, 2 bad input (recipe, data, arguments, model). `--debug` shows tracebacks.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from psft_lite import __version__
from psft_lite.errors import Interrupted, PsftError

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
    from psft_lite.recipe import load_recipe
    from psft_lite.train import run

    overrides = (set_ or []) + ([f"output.report_to={report_to}"] if report_to is not None else [])
    summary = run(load_recipe(recipe, overrides), console=err, overwrite=overwrite, resume=resume)
    if not summary["main"]:
        return  # other ranks of a distributed run stay quiet
    last = summary["last"] or {}
    err.print(
        f"[green]done[/green] in {summary['total_s']:.0f} s ({summary['steps']} steps, "
        f"{summary['steps'] / max(summary['train_s'], 1e-9):.2f} steps/s, peak memory {summary['peak_mem_mb']:.0f} "
        "MB)" + (f"; final nll {last['nll']:.3f}" if "nll" in last else "")
    )
    if "entropy_start" in summary:
        kept = summary["entropy_kept"]
        err.print(
            f"entropy on trained tokens: {summary['entropy_start']:.3f} over the first steps → "
            f"{summary['entropy_end']:.3f} over the last" + (f" (kept {kept:.0%})" if kept is not None else "")
        )
    if "drift" in summary:
        d = summary["drift"]
        err.print(
            f"drift from the base: {d:+.2f} nats at step {summary['drift_step']} (the training tokens are "
            f"{math.exp(d):.1f}× as likely as under the base model)"
        )
    else:
        err.print(
            "drift from the base: not measured (guard.drift_watch is off, or the run was shorter than "
            "guard.drift_every)"
        )
    out.print(f"adapter: {summary['adapter']}")
    out.print(f"metrics: {summary['metrics']}")
    if "merged" in summary:
        out.print(f"merged: {summary['merged']}")
    for path in summary.get("gguf", []):
        out.print(f"gguf: {path}")
    for line in summary["trackers"]:
        out.print(line, highlight=False)


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
    from psft_lite.modeling import offline

    offline()
    from psft_lite.data.sources import looks_local, resolve_local
    from psft_lite.errors import DataError
    from psft_lite.recipe import load_recipe
    from psft_lite.trackers import require

    parsed = load_recipe(recipe, set_ or [])
    require(parsed.output.report_to, f"{recipe}: output.report_to")
    base_dir = parsed.path.parent if parsed.path else None
    sources = [("data.train", parsed.data.train), ("data.eval", parsed.data.eval)] + [
        (f"eval.sets.{k}", v) for k, v in parsed.eval.sets.items()
    ]
    for name, src in sources:
        if src is not None and resolve_local(src.path, base_dir) is None and looks_local(src.path):
            raise DataError(
                f"{recipe}: {name}: file {src.path!r} not found (relative paths are read from the working directory)."
            )
    for w in parsed.warnings():
        err.print(f"[yellow]warning:[/yellow] {w}")
    o, t = parsed.objective, parsed.train
    out.print(f"[green]ok[/green] {recipe}")
    out.print(
        f"  model     {parsed.model.name}"
        + (" (4-bit NF4)" if parsed.model.load_in_4bit else "")
        + f", dtype {parsed.model.dtype}"
    )
    out.print(f"  lora      r={parsed.lora.r} alpha={parsed.lora.alpha:g} targets={parsed.lora.target_modules}")
    out.print(
        f"  data      {parsed.data.train.path}"
        + (f" [{parsed.data.train.config}]" if parsed.data.train.config else "")
        + f" split={parsed.data.train.split} format={parsed.data.format} max_length={parsed.data.max_length}"
    )
    out.print(
        f"  objective {o.kind}"
        + (
            f" old_policy={o.old_policy} refresh_every={o.refresh_every} clip_high={o.clip_high}"
            if o.kind == "psft"
            else ""
        )
    )
    steps = f"max_steps={t.max_steps}" if t.max_steps else f"epochs={t.epochs:g}"
    out.print(f"  train     lr={t.lr:g} {steps} batch={t.batch_size} micro={t.micro_batch_size} seed={t.seed}")
    out.print(f"  output    {parsed.run_dir}")
    if no_preflight:
        return
    from psft_lite.preflight import GB, run_preflight

    rep = run_preflight(parsed, out, deep=deep)
    st = rep.stats
    if "examples" in st:
        out.print(
            f"  examples  {st['examples']} of {st['rows']} rows; {st['trained_tokens']:,} trained of "
            f"{st['total_tokens']:,} tokens ({st['trained_share']:.0%}); longest {st['longest']}; "
            f"{st['dropped_too_long']} dropped, {st['truncated']} truncated"
        )
    if rep.memory is not None:
        m = rep.memory
        parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in m.parts.items())
        avail = f" of {m.available / GB:.1f} GB available" if m.available else ""
        flag = "" if m.fits is not False else "  [bold red]does not fit[/bold red]"
        out.print(f"  memory    ~{m.total / GB:.1f} GB peak on {m.device}{avail} ({parts}){flag}")
    if "deep_step_s" in st:
        out.print(
            f"  deep      one micro-step {st['deep_step_s']:.2f} s, peak {st['deep_peak_mem_mb']:.0f} MB, "
            f"{st['trainable_parameters']:,} trainable parameters"
        )
    for n in rep.notes:
        err.print(f"note: {n}")
    for w in rep.warnings:
        err.print(f"[yellow]warning:[/yellow] {w}")


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


def _source(path: str, config: str | None, split: str) -> Any:
    """A `--data` value as a data source (the split and configuration matter for hub ids and folders)."""
    from psft_lite.recipe import Source

    return Source(path=path, config=config, split=split)


def _dtype(d: str | None) -> str | None:
    from psft_lite.errors import RecipeError

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

    from psft_lite.errors import RecipeError
    from psft_lite.generate import generate as do_generate
    from psft_lite.generate import load_model, read_prompts

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
    loaded = load_model(model, _dtype(dtype))
    gens = do_generate(loaded, prompts, max_new_tokens, temperature, top_p, seed=seed)
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
    from transformers import TextStreamer

    from psft_lite.generate import chat_reply, load_model

    loaded = load_model(model, _dtype(dtype))
    history = [{"role": "system", "content": system}] if system else []
    messages = list(history)
    err.print(f"chatting with {loaded.label} — /reset, /exit")
    streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            err.print("")
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            messages = list(history)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        sys.stdout.write("model> ")
        sys.stdout.flush()
        reply = chat_reply(loaded, messages, max_new_tokens, temperature, top_p, stream=streamer)
        messages.append({"role": "assistant", "content": reply})


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
) -> None:
    """Math-answer accuracy (#### N and \\boxed{} answers), generation entropy and reference NLL per data set; or,
    with --tasks, standard benchmarks through lm-evaluation-harness.

    [dim]Example: psft-lite eval runs/quickstart -d in_domain=data/arith/test.jsonl -d ood=data/arith/ood.jsonl[/dim]
    [dim]Example: psft-lite eval runs/quickstart --tasks arith_test --include-path recipes/harness --compare-base[/dim]
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from psft_lite.errors import RecipeError
    from psft_lite.evaluate import eval_items, evaluate_set, write_outputs
    from psft_lite.generate import load_model
    from psft_lite.recipe import RowFormat

    if tasks is not None:
        if data:
            raise RecipeError("give --data (your own data) or --tasks (harness tasks), not both, in one eval.")
        _harness(
            model,
            tasks,
            out_dir,
            limit,
            num_fewshot,
            include_path or [],
            chat_template,
            compare_base,
            batch_size,
            _dtype(dtype),
        )
        return
    if num_fewshot is not None or include_path or compare_base or chat_template is not None:
        raise RecipeError("--num-fewshot, --include-path, --compare-base and --chat-template go with --tasks.")
    if samples > 1 and temperature == 0:
        raise RecipeError("--samples > 1 needs --temperature > 0 (greedy answers are identical).")
    loaded = load_model(model, _dtype(dtype))
    sets: dict[str, Any] = {}
    base_data = loaded.recipe.data if loaded.recipe else None
    if data:
        for item in data:
            name, _, path = item.rpartition("=") if "=" in item else (Path(item).stem, "", item)
            sets[name] = (
                _source(path, data_config, split),
                RowFormat(max_length=base_data.max_length if base_data else 4096),
            )
    elif loaded.recipe is not None and (loaded.recipe.eval.sets or loaded.recipe.data.eval):
        named = loaded.recipe.eval.sets or {"eval": loaded.recipe.data.eval}
        sets = {k: (v, loaded.recipe.data) for k, v in named.items()}
    else:
        raise RecipeError(
            "no data to evaluate: pass --data FILE (or NAME=FILE), or a run whose recipe has data.eval or eval.sets."
        )
    items = {name: eval_items(src, sec, limit=limit) for name, (src, sec) in sets.items()}
    summaries, predictions = {}, {}
    total = sum(len(v) for v in items.values()) * samples
    with Progress(
        TextColumn("[bold]eval[/bold] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as progress:
        task = progress.add_task("", total=total)
        for name, its in items.items():
            progress.update(task, description=name)
            summaries[name], predictions[name] = evaluate_set(
                loaded,
                its,
                samples,
                temperature,
                top_p,
                max_new_tokens,
                batch_size,
                progress=lambda n: progress.advance(task, n),
            )
    metric = "pass@1" if samples == 1 else f"avg@{samples}"
    for name, sm in summaries.items():
        out.print(
            f"{name:>12}  n={sm['n']:<5} {metric} {sm['accuracy']:.1%}   entropy {sm['mean_entropy']:.3f}   reference "
            f"NLL {sm['mean_nll']:.3f}   finished {sm['finished']:.0%}",
            highlight=False,
        )
    if out_dir is not None:
        write_outputs(out_dir, summaries, predictions)
        out.print(f"wrote {out_dir / 'summary.json'} and {out_dir / 'predictions.jsonl'}")


def _harness(
    model: str,
    tasks: str,
    out_dir: Path | None,
    limit: int | None,
    num_fewshot: int | None,
    include_path: list[Path],
    chat: bool | None,
    compare_base: bool,
    batch_size: int,
    dtype: str | None,
) -> None:
    from psft_lite import harness
    from psft_lite.errors import RecipeError

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise RecipeError("--tasks: no task named; e.g. --tasks gsm8k,arc_easy")
    report = harness.run(
        model,
        names,
        out_dir=out_dir,
        limit=limit,
        num_fewshot=num_fewshot,
        include_path=include_path,
        chat=chat,
        compare_base=compare_base,
        batch_size=batch_size,
        dtype=dtype,
        console=err,
    )
    out.print(harness.table(report), highlight=False, markup=False)
    seconds = report["model_scores"]["seconds"] + report.get("base_scores", {}).get("seconds", 0.0)
    err.print(
        f"harness: {', '.join(names)}"
        + (f", limit {limit}" if limit else "")
        + f", chat template {'on' if report['chat_template'] else 'off'}, {seconds:.0f} s"
    )
    for f in report.get("files", []):
        out.print(f"wrote {f}", highlight=False)


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
    """How in-distribution a data set is for a model: φ = log p + H per response token (METHODS.md §3).

    [dim]Example: psft-lite ddt smollm2-135m-instruct --data data/arith/train.jsonl --limit 200[/dim]
    """
    import json

    from psft_lite.data import load_examples
    from psft_lite.ddt import BINS, summarize, token_phi
    from psft_lite.generate import load_model
    from psft_lite.recipe import RowFormat

    loaded = load_model(model, _dtype(dtype))
    rows = RowFormat(max_length=max_length, truncation="truncate")
    examples, _ = load_examples(_source(data, data_config, split), rows, loaded.tokenizer, limit=limit)
    phis = token_phi(loaded.model, examples, loaded.tokenizer.pad_token_id, loaded.device, loaded.dtype)
    stats = summarize(phis)
    stats.update(model=str(model), data=data)
    if as_json:
        out.print(json.dumps(stats), highlight=False, soft_wrap=True)
        return
    out.print(f"DDT of {data} under {model}: {stats['examples']} examples, {stats['tokens']:,} response tokens")
    out.print(
        f"  mean φ {stats['mean_phi']:+.4f}  (per sequence {stats['mean_phi_per_sequence']:+.4f}, std "
        f"{stats['std_phi']:.3f})"
    )
    out.print(
        f"  share φ > 0: {stats['share_phi_gt_0']:.1%}   > −1: {stats['share_phi_gt_-1']:.1%}   > −3: "
        f"{stats['share_phi_gt_-3']:.1%}   > −5: {stats['share_phi_gt_-5']:.1%}"
    )
    counts = stats["histogram"]["counts"]
    edges = ["−∞", *[f"{b:g}" for b in BINS], "∞"]
    top = max(counts) or 1
    for i, c in enumerate(counts):
        out.print(f"  [{edges[i]:>4}, {edges[i + 1]:>4})  {'█' * round(30 * c / top):<30} {c}", highlight=False)
    out.print(f"  verdict: {stats['verdict']}")


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
    from psft_lite.errors import RecipeError
    from psft_lite.generate import load_model
    from psft_lite.hinted import HintConfig, run
    from psft_lite.recipe import FORMATS, RowFormat

    if fmt not in FORMATS:
        raise RecipeError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}.")
    if keep not in ("correct", "all"):
        raise RecipeError(f"--keep {keep!r}: choose correct or all.")
    loaded = load_model(model, _dtype(dtype))
    cfg = HintConfig(
        beta=beta,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        answer_marker=answer_marker,
        seed=seed,
        cot_fallback=cot_fallback,
    )
    s = run(
        loaded,
        _source(data, data_config, split),
        RowFormat(format=fmt),
        out_file,
        cfg,
        keep,
        min_phi,
        limit,
        console=err,
    )
    acc = s["correct"] / s["decoded"] if s["decoded"] else float("nan")
    out.print(
        f"hint: {s['kept']} of {s['examples']} kept; dropped {s['no_cot']} without # CoT, {s['unfinished']} "
        f"unfinished (length/repetition), {s['wrong_answer']} wrong answer, {s['low_phi']} below --min-phi "
        f"({s['skipped_done']} were done before this run)"
    )
    if s["decoded"]:
        out.print(
            f"  answer accuracy of the rewrites {acc:.0%} ({s['correct']}/{s['decoded']}); mean φ reference "
            f"{s['mean_phi_reference']:+.3f} → rewrites {s['mean_phi_hinted']:+.3f}"
        )
    if s["kept"]:
        out.print(
            f"  kept rewrites: mean φ {s['mean_phi_kept']:+.3f} (their references {s['mean_phi_reference_kept']:+.3f})"
        )
    out.print(f'  wrote {s["out"]} (train on it directly: data.train = "{s["out"]}") and {s["dropped_file"]}')


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
) -> None:
    """Train every objective for several epochs and seeds on one recipe, evaluate each epoch end, report.

    With --sweep, every method runs at every point of a grid of recipe values (keys a method does not read, such as
    objective.refresh_every for sft, are not crossed with it). Resumable: rerun the same command to continue;
    processes may share one study folder (one per --seeds value). Runs on a real model with --set model.name=...

    [dim]Example: psft-lite study recipes/study/arith.toml[/dim]
    [dim]Example: psft-lite study recipes/study/arith.toml --methods sft,psft-base --sweep train.lr=3e-4,1e-3[/dim]
    """
    from psft_lite.errors import RecipeError
    from psft_lite.metrics import read_metrics
    from psft_lite.recipe import load_recipe
    from psft_lite.study import latest_results, parse_sweep, plot_study, report_tables, run_study

    parsed = load_recipe(recipe, set_ or [])
    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        raise RecipeError(f"--seeds {seeds!r}: expected comma-separated integers, e.g. 0,1") from None
    grid = parse_sweep(sweep or [])
    folder = out_dir or parsed.run_dir
    results_path = run_study(
        parsed,
        [m.strip() for m in methods.split(",") if m.strip()],
        seed_list,
        folder,
        limit,
        max_new_tokens,
        err,
        sweep=grid,
        eval_every=eval_every,
    )
    results = latest_results(read_metrics(results_path))
    dest = report or folder
    dest.mkdir(parents=True, exist_ok=True)
    sets = list(parsed.eval.sets)
    (dest / "tables.md").write_text(report_tables(results, sets), encoding="utf-8")
    pngs = plot_study(results, dest, folder, sets)
    out.print(f"results: {results_path}\ntables: {dest / 'tables.md'}\nfigures: {', '.join(map(str, pngs))}")


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
    from psft_lite.plot import plot_runs

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
    from psft_lite.merge import merge as do_merge

    report = do_merge(
        source, out=out, base=base, dtype=_dtype(dtype), verify=not no_verify, from_original=from_original, console=err
    )
    out_console.print(f"merged: {report['out']}")


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
    from psft_lite.export import export as do_export

    report = do_export(
        source, out=out, quant=quant, adapter_only=adapter_only, overwrite=overwrite, verify=not no_verify, console=err
    )
    for f in report["files"]:
        out_console.print(f"gguf: {f['path']}")


@app.command("env")
def env_(
    as_json: Annotated[bool, typer.Option("--json", help="Print the facts as JSON instead of markdown.")] = False,
) -> None:
    """Versions, hardware and whether 4-bit works here, as a markdown block to paste into a bug report.

    Always exits 0; anything missing is said. Token values are never printed.

    [dim]Example: psft-lite env[/dim]
    """
    import json

    from psft_lite.environment import collect, markdown

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
