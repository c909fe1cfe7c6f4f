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

from psft_lite import __version__
from psft_lite.errors import PsftError

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
    typer.Option("--set", "-s", help="Override a recipe key, e.g. --set train.lr=1e-4 (repeatable).", show_default=False),
]


def _version(value: bool) -> None:
    if value:
        out.print(f"psft-lite {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
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
        typer.Option("--resume", help="Continue from a checkpoint: `latest` (the default when given alone) or a "
                     "checkpoint folder.", show_default=False),
    ] = None,
) -> None:
    """Fine-tune as the recipe says; writes the run directory (adapter/, metrics.jsonl, checkpoints/, recipe.toml).

    Ctrl-C (or SIGTERM) finishes the current step, saves a checkpoint and prints the command to resume.

    [dim]Example: psft-lite train recipes/quickstart.toml --set train.max_steps=20[/dim]
    [dim]Example: psft-lite train runs/quickstart/recipe.toml --resume[/dim]
    """
    from psft_lite.recipe import load_recipe
    from psft_lite.train import run

    r = load_recipe(recipe, set_ or [])
    summary = run(r, console=err, overwrite=overwrite, resume=resume)
    last = summary["last"] or {}
    err.print(
        f"[green]done[/green] in {summary['total_s']:.0f} s ({summary['steps']} steps, "
        f"{summary['steps'] / max(summary['train_s'], 1e-9):.2f} steps/s, peak memory {summary['peak_mem_mb']:.0f} MB)"
        + (f"; final nll {last['nll']:.3f}" if "nll" in last else "")
    )
    out.print(f"adapter: {summary['adapter']}")
    out.print(f"metrics: {summary['metrics']}")


@app.command()
def validate(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Check a recipe (schema, values, local paths) without loading any model or downloading anything.

    [dim]Example: psft-lite validate recipes/math.toml[/dim]
    """
    from psft_lite.data.sources import looks_local, resolve_local
    from psft_lite.errors import DataError
    from psft_lite.recipe import load_recipe

    r = load_recipe(recipe, set_ or [])
    base_dir = r.path.parent if r.path else None
    for name, src in (("data.train", r.data.train), ("data.eval", r.data.eval)):
        if src is not None and resolve_local(src.path, base_dir) is None and looks_local(src.path):
            raise DataError(f"{recipe}: {name}: file {src.path!r} not found (relative paths are read from the working directory).")
    for w in r.warnings():
        err.print(f"[yellow]warning:[/yellow] {w}")
    o, t = r.objective, r.train
    out.print(f"[green]ok[/green] {recipe}")
    out.print(f"  model     {r.model.name}" + (" (4-bit NF4)" if r.model.load_in_4bit else "") + f", dtype {r.model.dtype}")
    out.print(f"  lora      r={r.lora.r} alpha={r.lora.alpha:g} targets={r.lora.target_modules}")
    out.print(f"  data      {r.data.train.path}" + (f" [{r.data.train.config}]" if r.data.train.config else "")
              + f" split={r.data.train.split} format={r.data.format} max_length={r.data.max_length}")  # fmt: skip
    out.print(f"  objective {o.kind}" + (f" old_policy={o.old_policy} refresh_every={o.refresh_every} clip_high={o.clip_high}" if o.kind == "psft" else ""))
    steps = f"max_steps={t.max_steps}" if t.max_steps else f"epochs={t.epochs:g}"
    out.print(f"  train     lr={t.lr:g} {steps} batch={t.batch_size} micro={t.micro_batch_size} seed={t.seed}")
    out.print(f"  output    {r.run_dir}")


@app.command()
def merge(
    source: Annotated[Path, typer.Argument(help="Run directory, its adapter/ folder, or a checkpoints/step-N folder.", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder. Default: RUN_DIR/merged.", show_default=False)] = None,
    base: Annotated[Optional[str], typer.Option("--base", help="Base model to merge into, if not the one trained on.", show_default=False)] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="bf16, fp16 or fp32. Default: the training precision.", show_default=False)] = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the logits check against the adapter model.")] = False,
    from_original: Annotated[bool, typer.Option("--from-original", help="Merge into the original full-precision weights instead of the dequantized 4-bit ones (differs from what was trained).")] = False,
) -> None:
    """Fold the adapter into its base and write a plain transformers model folder; checks its logits match.

    [dim]Example: psft-lite merge runs/quickstart --out models/quickstart-merged[/dim]
    """
    from psft_lite.errors import RecipeError
    from psft_lite.merge import merge as do_merge

    if dtype is not None and dtype not in ("bf16", "fp16", "fp32"):
        raise RecipeError(f"--dtype {dtype!r}: choose bf16, fp16 or fp32.")
    report = do_merge(source, out=out, base=base, dtype=dtype, verify=not no_verify, from_original=from_original, console=err)
    out_console.print(f"merged: {report['out']}")


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
        err.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":  # pragma: no cover
    main()
