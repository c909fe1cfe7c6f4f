"""`psft-lite validate`: check a recipe without training — its keys and values, its data files, and (preflight) the
data as the model will see it and an estimate of peak memory. Never downloads anything."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from psft_lite.core.errors import DataError
from psft_lite.recipe.schema import Recipe, load_recipe


def check_data_files(recipe: Recipe, label: Path) -> None:
    """Every local data file the recipe names exists (hub ids and folders are checked by the preflight)."""
    from psft_lite.data.sources import looks_local, resolve_local

    base_dir = recipe.path.parent if recipe.path else None
    train = recipe.data.train
    sources = [(f"data.train[{i}]" if len(train) > 1 else "data.train", s) for i, s in enumerate(train)]
    sources += [("data.eval", recipe.data.eval)]
    sources += [(f"eval.sets.{k}", v) for k, v in recipe.eval.sets.items()]
    for name, src in sources:
        if src is not None and resolve_local(src.path, base_dir) is None and looks_local(src.path):
            raise DataError(
                f"{label}: {name}: file {src.path!r} not found (relative paths are read from the working directory)."
            )


def recipe_lines(r: Recipe) -> list[str]:
    """The recipe's essentials, one line per section."""
    o, t, d = r.objective, r.train, r.data
    psft = f" old_policy={o.old_policy} refresh_every={o.refresh_every} clip_high={o.clip_high}"
    steps = f"max_steps={t.max_steps}" if t.max_steps else f"epochs={t.epochs:g}"
    return [
        f"  model     {r.model.name}" + (" (4-bit NF4)" if r.model.load_in_4bit else "") + f", dtype {r.model.dtype}",
        f"  lora      r={r.lora.r} alpha={r.lora.alpha:g} targets={r.lora.target_modules}",
        f"  data      {', '.join(s.path + (f' [{s.config}]' if s.config else '') for s in d.train)}"
        + (f" split={d.train[0].split}" if len(d.train) == 1 else f" weights={d.weights or 'one pass each'}")
        + f" format={d.format} max_length={d.max_length}"
        + (f" self-replay={d.replay.ratio:.0%}" if d.replay.ratio else ""),
        f"  objective {o.kind}" + (psft if o.kind == "psft" else ""),
        f"  train     lr={t.lr:g} {steps} batch={t.batch_size} micro={t.micro_batch_size} seed={t.seed}",
        f"  output    {r.run_dir}",
    ]


def preflight_lines(rep: object) -> list[str]:
    """The preflight's findings: examples and tokens, the memory estimate, the deep step's timing."""
    from psft_lite.training.preflight import GB

    st, lines = rep.stats, []
    for s in st.get("sources", []):
        lines.append(
            f"  source    {s['name']}: {s['examples']} examples, {s['trained_tokens']:,} trained tokens; "
            f"{s['share']:.1%} of the examples drawn per epoch"
        )
    if "examples" in st:
        lines.append(
            f"  examples  {st['examples']} of {st['rows']} rows; {st['trained_tokens']:,} trained of "
            f"{st['total_tokens']:,} tokens ({st['trained_share']:.0%}); longest {st['longest']}; "
            f"{st['dropped_too_long']} dropped, {st['truncated']} truncated"
        )
    if rep.memory is not None:
        m = rep.memory
        parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in m.parts.items())
        avail = f" of {m.available / GB:.1f} GB available" if m.available else ""
        flag = "" if m.fits is not False else "  [bold red]does not fit[/bold red]"
        lines.append(f"  memory    ~{m.total / GB:.1f} GB peak on {m.device}{avail} ({parts}){flag}")
    if "deep_step_s" in st:
        lines.append(
            f"  deep      one micro-step {st['deep_step_s']:.2f} s, peak {st['deep_peak_mem_mb']:.0f} MB, "
            f"{st['trainable_parameters']:,} trainable parameters"
        )
    return lines


def validate(path: Path, overrides: list[str], deep: bool, preflight: bool, out: Console, err: Console) -> None:
    """Check the recipe at `path` and print what it will do; raises a `PsftError` on the first problem."""
    from psft_lite.model.runtime import offline
    from psft_lite.tracking.trackers import require

    offline()
    recipe = load_recipe(path, overrides)
    require(recipe.output.report_to, f"{path}: output.report_to")
    check_data_files(recipe, path)
    if recipe.data.replay.ratio > 0:
        from psft_lite.inference.replay import read_prompts

        read_prompts(recipe.data.replay, recipe.path.parent if recipe.path else None)
    for w in recipe.warnings():
        err.print(f"[yellow]warning:[/yellow] {w}")
    out.print(f"[green]ok[/green] {path}")
    for line in recipe_lines(recipe):
        out.print(line)
    if not preflight:
        return
    from psft_lite.training.preflight import run_preflight

    rep = run_preflight(recipe, out, deep=deep)
    for line in preflight_lines(rep):
        out.print(line)
    for n in rep.notes:
        err.print(f"note: {n}")
    for w in rep.warnings:
        err.print(f"[yellow]warning:[/yellow] {w}")
