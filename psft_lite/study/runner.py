"""`psft-lite study`: train every objective on the same recipe for several epochs and seeds, evaluate each
epoch-end checkpoint, and report — the forgetting benchmark of docs/study.md, rerunnable on any model.

Each (method, seed) is an ordinary run in OUT/<method>-s<seed>/ with a checkpoint at every epoch end; evaluations
are appended to OUT/results.jsonl as they finish. Rerunning skips finished runs and evaluations and resumes an
interrupted run from its newest checkpoint.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from psft_lite.core import rundir
from psft_lite.core.errors import RecipeError
from psft_lite.core.extras import require_extra
from psft_lite.core.files import atomic_write_text
from psft_lite.core.rundir import list_checkpoints
from psft_lite.model import loading
from psft_lite.recipe.schema import Recipe, parse_override, recipe_from_dict
from psft_lite.study.curves import latest_results
from psft_lite.study.methods import METHODS, PROBE, Cell, _fmt, reads
from psft_lite.study.report import plot_study, report_tables
from psft_lite.tracking.metrics import read_metrics

if TYPE_CHECKING:
    from psft_lite.inference.retention import SuiteItem


def evaluate_model(
    spec: str | Path,
    sets: dict[str, Any],
    limit: int,
    max_new_tokens: int,
    base_cache: dict | None = None,
    general: list[SuiteItem] | None = None,
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """(scores, details) of one model. Scores: accuracy and generation entropy on each set (its first `limit`
    problems), the reference NLL and the KL to the base on the probe (the only set whose NLL the report reads), NLL
    and KL on retention sets, and what a bootstrap resamples — per generated problem a 0/1 string (`correct`; for a
    taught-format set also `format_used`, `answer_right`), a retention set's per-prompt KL, and with `general` (suite
    items) the retention suite's 0/1 per item (`general.right`, the base's results cached per base model);
    `eval_seconds`, the wall time of the sets and of the suite. Details: every generation and every suite answer,
    for the record."""
    from psft_lite.inference import retention
    from psft_lite.inference.evaluate import evaluate_sets, taught_openings
    from psft_lite.inference.generate import load_model

    loaded = load_model(spec)
    t0 = time.perf_counter()
    firsts = {name: items[:limit] for name, items in sets.items()}
    summaries, predictions = evaluate_sets(
        loaded,
        firsts,
        max_new_tokens=max_new_tokens,
        batch_size=32,
        nll=(PROBE,),  # the report reads the reference NLL only on the probe
        kl_sets=(PROBE,),
        base_cache=base_cache,
    )
    keep = ("accuracy", "mean_entropy", "mean_nll", "n", "kl_to_base", "rows", "finished")
    keep += ("format_rate", "answer_accuracy", "kl_rows")
    out = {name: {k: sm[k] for k in keep if k in sm} for name, sm in summaries.items()}
    details = {name: preds for name, preds in predictions.items() if preds}
    for name, preds in predictions.items():
        for flag in ("correct", "format_used", "answer_right"):
            if preds and flag in preds[0]:
                out[name][flag] = "".join("1" if p[flag] else "0" for p in preds)
    seconds = {"sets": round(time.perf_counter() - t0, 2)}  # what each part cost: a plan's units are sized by it
    if general is not None:
        verdict = retention.evaluate_retention(loaded, general, kl_prompts=0, taught=taught_openings(sets))
        run = verdict.after
        out["general"] = {"n": len(run.items), "accuracy": run.accuracy(), "right": run.to_json()["right"]}
        details["general"] = [
            {"id": it.id, "kind": it.kind, "right": ok, "answer": answer}
            for it, ok, answer in zip(run.items, run.right, run.answers)
        ]
        seconds["general"] = round(verdict.seconds, 2)
    return {**out, "eval_seconds": seconds}, details


# ---------------------------------------------------------------------------------------------------------------------
# The grid: methods × sweep cells × seeds. A sweep key a method does not read (e.g. objective.refresh_every for sft) is
# dropped from that method's cells, so no identical run is trained twice.


Sweep = list[tuple[tuple[str, ...], list[tuple[Any, ...]]]]


def parse_sweep(items: list[str]) -> Sweep:
    """`--sweep train.lr=1e-4,1e-3` → [((train.lr,), [(1e-4,), (1e-3,)])]; keys joined by `:` move together:
    `--sweep train.lr:train.epochs=1e-4:12,1e-3:4` (a low lr given more epochs). Values are TOML, as with --set."""
    out, seen = [], set()
    for item in items:
        key_part, eq, value_part = item.partition("=")
        keys = tuple(k.strip() for k in key_part.split(":"))
        if not eq or not all(keys) or not all("." in k for k in keys):
            raise RecipeError(f"--sweep {item!r}: expected SECTION.KEY=V1,V2,... e.g. --sweep train.lr=1e-4,3e-4,1e-3")
        if {"objective.kind", "objective.old_policy"} & set(keys):
            raise RecipeError(f"--sweep {item!r}: choose objectives and old policies with --methods, not --sweep.")
        if seen & set(keys):
            raise RecipeError(f"--sweep {item!r}: {sorted(seen & set(keys))[0]} is swept twice.")
        seen |= set(keys)
        groups = [g for g in value_part.split(",") if g.strip()]
        if not groups:
            raise RecipeError(f"--sweep {item!r}: no values to sweep; give at least one after '='.")
        values = []
        for g in groups:
            parts = g.split(":")
            if len(parts) != len(keys):
                raise RecipeError(f"--sweep {item!r}: {g!r} has {len(parts)} value(s) for {len(keys)} key(s).")
            values.append(tuple(parse_override(f"{k}={v}")[1] for k, v in zip(keys, parts)))
        shown = [":".join(map(_fmt, v)) for v in values]
        if len(set(shown)) < len(shown):  # run names and labels show a file by its stem
            twice = next(x for x in shown if shown.count(x) > 1)
            raise RecipeError(
                f"--sweep {item!r}: two values would be labelled {twice!r} (a file shows as its name without folder "
                "and extension), so their runs would share a folder. Give the files different names."
            )
        out.append((keys, values))
    return out


def grid(sweep: Sweep, method: str) -> list[Cell]:
    """The distinct cells of `method`: the cross product of the sweeps, less the objective keys it does not read."""
    reads_ = reads(method)
    cells: list[Cell] = [Cell()]
    for keys, values in sweep:
        cells = [Cell(c.values + tuple(zip(keys, v))) for c in cells for v in values]
    prefix = "objective."
    kept = [
        Cell(tuple((k, v) for k, v in c.values if not k.startswith(prefix) or k[len(prefix) :] in reads_))
        for c in cells
    ]
    return list(dict.fromkeys(kept))


def cell_recipe(base: Recipe, method: str, cell: Cell, seed: int, run_dir: Path) -> Recipe:
    """The recipe of one run of the study; a bad sweep key or value is reported under the sweep's name."""
    raw = base.model_dump(mode="json", exclude_none=True)
    settings = METHODS[method]
    raw["objective"] = {**raw["objective"], **{k: v for k, v in settings.items() if "." not in k}}
    extra = tuple((k, v) for k, v in settings.items() if "." in k)
    for key, value in extra + cell.values:
        node = raw
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--sweep {key}: {part} is a value, not a section.")
        node[last] = value
    raw["train"].update(seed=seed, keep_last=0)
    raw["eval"]["every"] = 0
    raw["output"] = {**raw["output"], "dir": str(run_dir)}
    return recipe_from_dict(raw, source=f"--sweep {cell.label}" if cell.values else f"study:{method}")


@dataclass
class Job:
    """One training run of the study and the optimizer steps at which it is evaluated (epoch ends, and the early
    steps the recipe's `train.save_at` names)."""

    method: str
    cell: Cell
    seed: int
    recipe: Recipe
    steps_per_epoch: int
    eval_steps: list[int]

    @property
    def run_dir(self) -> Path:
        return self.recipe.run_dir

    def key(self, step: int) -> tuple[str, str, int, int]:
        return (self.method, self.cell.label, self.seed, step)

    def epoch(self, step: int) -> float:
        """Epochs done after `step` steps: a whole number at an epoch end, else to three decimals."""
        whole, rest = divmod(step, self.steps_per_epoch)
        return whole if not rest else round(step / self.steps_per_epoch, 3)


def plan_jobs(
    recipe: Recipe, methods: list[str], seeds: list[int], sweep: Sweep, out: Path, eval_every: int, tokenizer: Any
) -> list[Job]:
    """Every run of the study, its recipe checked before anything trains and its epoch length counted."""
    jobs, n_examples = [], {}
    base_dir = recipe.path.parent if recipe.path else None
    for method in methods:
        for cell in grid(sweep, method):
            for seed in seeds:
                job_recipe = cell_recipe(recipe, method, cell, seed, out / cell.run_name(method, seed))
                t, d = job_recipe.train, job_recipe.data
                if t.max_steps is not None or int(t.epochs) != t.epochs:
                    raise RecipeError(
                        "a study trains whole epochs: set train.epochs to an integer and leave train.max_steps unset."
                    )
                data_key = d.model_dump_json()
                if data_key not in n_examples:  # the data section decides how many examples an epoch has
                    n_examples[data_key] = epoch_size(d, tokenizer, base_dir)
                steps = math.ceil(n_examples[data_key] / t.batch_size)
                job_recipe.train.save_every = steps  # a checkpoint at every epoch end
                epochs = int(t.epochs)
                evals = sorted({e for e in range(1, epochs + 1) if e % eval_every == 0} | {epochs})
                early = {s for s in t.save_at if s < epochs * steps}
                jobs.append(Job(method, cell, seed, job_recipe, steps, sorted({e * steps for e in evals} | early)))
    return jobs


def epoch_size(d: Any, tokenizer: Any, base_dir: Path | None) -> int:
    """Examples an epoch draws, as training will count them (every source, packing, weights; self-replay's share
    depends only on the ratio and the user's data, so its answers need not exist yet)."""
    from psft_lite.data import load_sources
    from psft_lite.data.batching import epoch_draws, pack_examples

    sizes = [
        len(pack_examples(s.examples, d.max_length) if d.packing else s.examples)
        for s in load_sources(d, tokenizer, base_dir=base_dir)
    ]
    return sum(epoch_draws(sizes, d.weights, (1, d.replay.ratio) if d.replay.ratio > 0 else None))


def study(
    recipe: Recipe,
    methods: str,
    seeds: str,
    out: Path | None,
    limit: int,
    max_new_tokens: int,
    report: Path | None,
    sweep: list[str],
    eval_every: int,
    console: Console,
    base: bool = True,
) -> tuple[Path, Path, list[Path]]:
    """`psft-lite study`: run (or resume) the study, then write its tables and figures; returns (results.jsonl,
    tables.md, figures)."""
    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        raise RecipeError(f"--seeds {seeds!r}: expected comma-separated integers, e.g. 0,1") from None
    grid = parse_sweep(sweep)
    folder = out or recipe.run_dir
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    results_path = run_study(
        recipe,
        method_list,
        seed_list,
        folder,
        limit,
        max_new_tokens,
        console,
        sweep=grid,
        eval_every=eval_every,
        base=base,
    )
    results = latest_results(read_metrics(results_path))
    dest = report or folder
    dest.mkdir(parents=True, exist_ok=True)
    sets = list(recipe.eval.sets)
    tables = atomic_write_text(dest / "tables.md", report_tables(results, sets))
    return results_path, tables, plot_study(results, dest, folder, sets)


def run_study(
    recipe: Recipe,
    methods: list[str],
    seeds: list[int],
    out: Path,
    limit: int,
    max_new_tokens: int,
    console: Console,
    sweep: Sweep | None = None,
    eval_every: int = 1,
    base: bool = True,
) -> Path:
    """Train and evaluate everything that is not done yet (the base model too, unless `base` is False; `methods`
    ["base"] evaluates only it); returns OUT/results.jsonl."""
    from psft_lite.inference.evaluate import recipe_eval_items
    from psft_lite.training import trainer

    require_extra("matplotlib", "psft-lite study draws its figures with matplotlib")  # before hours of training
    methods = [m for m in methods if m != "base"]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise RecipeError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}.")
    if not recipe.eval.sets:
        raise RecipeError("the study recipe needs eval.sets (e.g. in_domain, ood and probe) to evaluate each epoch on.")
    jobs = plan_jobs(recipe, methods, seeds, sweep or [], out, eval_every, loading.load_tokenizer(recipe.model))
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    done = {(rec["method"], rec.get("cell_label", ""), rec["seed"], rec["step"]) for rec in _read(results_path)}
    sets = recipe_eval_items(recipe)  # each set in its own format, every file checked before anything trains
    general = None  # the general-ability suite's items, scored at every evaluation
    if recipe.eval.retention:
        from psft_lite.inference.retention import load_suite

        general = load_suite(kinds=recipe.eval.retention_kinds)
    n_steps = sum(int(j.recipe.train.epochs) * j.steps_per_epoch for j in jobs if not _trained(j.run_dir))
    base_key = ("base", "", 0, 0)
    n_evals = len(({j.key(s) for j in jobs for s in j.eval_steps} | ({base_key} if base else set())) - done)
    cells = len({(j.method, j.cell) for j in jobs})
    plan = f"study: {len(jobs)} runs ({cells} method × sweep cells × {len(seeds)} seed(s))"
    if n_steps:  # an interrupted run counts whole: a rough upper bound
        t_step = _time_one_step(recipe, console)
        plan += f"; to do: {n_steps} steps at ~{t_step:.1f} s/step ≈ {n_steps * t_step * 1.15 / 60:.0f} min"
    console.print(
        plan + f"; {n_evals} evaluation(s) of {sum(min(len(v), limit) for v in sets.values())} problems to do"
    )
    t0 = time.perf_counter()
    base_cache: dict = {}  # every run adapts one base model: its retention forward is computed once
    if base and base_key not in done:
        scores, details = evaluate_model(recipe.model.name, sets, limit, max_new_tokens, base_cache, general)
        _write_details(out, "base", 0, details)
        _append(
            results_path, {"method": "base", "cell": {}, "cell_label": "", "seed": 0, "epoch": 0, "step": 0, **scores}
        )
    for job in jobs:
        what = f"[bold]{job.method}[/bold]" + (f" {job.cell.label}" if job.cell.values else "") + f" seed {job.seed}"
        if not _trained(job.run_dir):
            resume = "latest" if list_checkpoints(job.run_dir) else None
            console.print(f"{what}: " + ("resuming" if resume else "training"))
            trainer.run(job.recipe, console=console, overwrite=resume is None, resume=resume)
        evaluate_checkpoints(job, sets, limit, max_new_tokens, base_cache, done, results_path, general)
        console.print(f"  done {what} ({(time.perf_counter() - t0) / 60:.0f} min so far)")
    return results_path


def evaluate_checkpoints(
    job: Job,
    sets: dict[str, Any],
    limit: int,
    max_new_tokens: int,
    base_cache: dict,
    done: set,
    results: Path,
    general: list[SuiteItem] | None = None,
) -> None:
    """Evaluate each checkpoint of a run at one of its evaluation steps that is not in `done`, appending one record
    per checkpoint and writing its details (every answer) beside the results."""
    previous = 0
    for step, ckpt in list_checkpoints(job.run_dir):
        if step not in job.eval_steps:
            continue
        window, previous = (previous, step), step
        if job.key(step) in done:
            continue
        scores, details = evaluate_model(ckpt, sets, limit, max_new_tokens, base_cache, general)
        _write_details(results.parent, job.cell.run_name(job.method, job.seed), step, details)
        _append(
            results,
            {
                "method": job.method,
                "cell": dict(job.cell.values),
                "cell_label": job.cell.label,
                "seed": job.seed,
                "epoch": job.epoch(step),
                "step": step,
                **_train_stats(job.run_dir, *window),
                **scores,
            },
        )
        done.add(job.key(step))


def _write_details(folder: Path, run: str, step: int, details: dict[str, Any]) -> None:
    """Every answer behind one evaluation (each generation and what it was scored, each suite item's answer), so
    anyone can recheck a verdict: OUT/evals/<run>-step<N>.jsonl.gz, one line per set."""
    import gzip

    path = folder / "evals" / f"{run}-step{step}.jsonl.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps({"set": name, "rows": rows}, ensure_ascii=False) + "\n" for name, rows in details.items())
    tmp = path.with_suffix(".tmp")
    with gzip.GzipFile(tmp, "wb", mtime=0) as g:
        g.write(text.encode())
    tmp.replace(path)


def _trained(run_dir: Path) -> bool:
    """The run finished: its final adapter exists."""
    return rundir.is_adapter_dir(rundir.adapter_dir(run_dir))


def _time_one_step(recipe: Recipe, console: Console) -> float:
    """Seconds per optimizer step, measured on one step of the recipe (model load excluded)."""
    from psft_lite.training.build import build
    from psft_lite.training.step import train_step

    raw = recipe.model_dump(mode="json", exclude_none=True)
    raw["output"]["dir"] = str(Path("/tmp") / f"psft-lite-study-probe-{id(recipe)}")
    run = build(recipe_from_dict(raw), Console(quiet=True), overwrite=True)
    train_step(run, 0)  # warm-up
    t0 = time.perf_counter()
    train_step(run, 1)
    return time.perf_counter() - t0


def _train_stats(run_dir: Path, start: int, step: int) -> dict[str, float | None]:
    """Means over the steps after `start` up to `step` (since the previous evaluation), from the run's metrics:
    entropy and NLL of the trained tokens and (psft) the clip fraction."""
    steps = [
        rec for rec in read_metrics(rundir.metrics_file(run_dir)) if "event" not in rec and start < rec["step"] <= step
    ]
    out: dict[str, float | None] = {}
    for name, key in (("train_entropy", "entropy"), ("train_nll", "nll"), ("clip_frac", "clip_frac")):
        values = [rec[key] for rec in steps if key in rec]
        out[name] = statistics.mean(values) if values else None
    return out


def _read(path: Path) -> list[dict[str, Any]]:
    return read_metrics(path) if path.exists() else []


def _append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
