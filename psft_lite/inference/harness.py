"""`psft-lite eval --tasks`: standard benchmarks through lm-evaluation-harness, on the model as psft-lite loads it.

A run directory is evaluated as trained — its base (4-bit or not) with its adapter, no merged copy written — and with
`--compare-base` the same loaded model is evaluated again with the adapter disabled (peft's `disable_adapter()` gives
exactly the base), so the forgetting table costs no second load. The chat template is the one the run trained with.

Offline by design: task data must already be in the local datasets cache (or be a local task, `--include-path`); a
task whose data is missing fails at once, naming the data set to fetch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from psft_lite.core import rundir
from psft_lite.core.errors import DataError, Interrupted, RecipeError
from psft_lite.core.extras import require_extra
from psft_lite.core.files import atomic_write_text

#: metric keys lm-eval reports that are not scores
_NOT_SCORES = ("alias", "samples", "name", "sample_len", "sample_count")


def require() -> None:
    require_extra(
        "lm_eval", "--tasks runs lm-evaluation-harness", otherwise=", or evaluate on your own data with --data FILE"
    )


def task_manager(tasks: list[str], include_path: list[Path]) -> Any:
    """lm-eval's task index with `include_path` folders added; every name in `tasks` must be in it (exit 2 with
    the closest names otherwise)."""
    from lm_eval.tasks import TaskManager

    from psft_lite.recipe.toml_errors import did_you_mean

    for p in include_path:
        if not p.is_dir() and not p.is_file():
            raise RecipeError(f"--include-path {p}: no such folder (a folder of lm-eval task YAML files).")
    paths = [str(p) for p in include_path]
    if paths:  # tasks of the user's own: their folders alone, when every name is a plain task there
        own = TaskManager(include_path=paths, include_defaults=False)
        if all(name in own.all_subtasks for name in tasks):
            return own  # lm-eval's index of its ~15k tasks takes ~8 s to build and would not be used
    tm = TaskManager(include_path=paths or None)
    for name in tasks:
        if name not in tm.all_tasks:
            hint = did_you_mean(name, tm.all_tasks)
            raise RecipeError(
                f"--tasks: {name!r} is not an lm-evaluation-harness task, group or tag{hint}. List them with "
                "`lm-eval ls tasks`; a task of your own goes in a YAML file in a folder given with --include-path."
            )
    return tm


def check_task_data(tm: Any, tasks: list[str]) -> None:
    """Load each task once (its data from the local cache) so that missing data fails now, naming the data set."""
    for name in tasks:
        try:
            tm.load([name])
        except Exception as e:  # datasets raises several kinds when offline  # noqa: BLE001
            cfg = tm.task_index[name].cfg or {}
            ds = cfg.get("dataset_path")
            what = f"the data set {ds!r}" + (f" (config {cfg['dataset_name']!r})" if cfg.get("dataset_name") else "")
            fetch = (
                f' Fetch it once where there is internet: python -c "import datasets; datasets.load_dataset('
                f"'{ds}'" + (f", '{cfg['dataset_name']}'" if cfg.get("dataset_name") else "") + ')"'
                if ds and ds not in ("json", "csv", "parquet", "text")
                else ""
            )
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise DataError(
                f"--tasks {name}: could not load {what if ds else 'its data'} from the local cache ({first}). "
                f"psft-lite runs the harness offline.{fetch}"
            ) from None


def _progress_lm(loaded: Any, batch_size: int) -> Any:
    """lm-eval's HF model around psft-lite's loaded model, answering requests in chunks under one rich progress bar
    (and psft-lite's autocast, as `psft-lite eval` computes)."""
    from lm_eval.models.huggingface import HFLM

    from psft_lite.model import scoring
    from psft_lite.model.chat import end_of_turn_id

    class ProgressLM(HFLM):
        chunk = max(batch_size * 4, 32)
        progress: Progress | None = None

        def _chunked(self, method: str, requests: list[Any], what: str) -> list[Any]:
            fn = getattr(super(), method)
            out: list[Any] = []
            task = self.progress.add_task(what, total=len(requests)) if self.progress else None
            for i in range(0, len(requests), self.chunk):
                with scoring.autocast(loaded.device, loaded.dtype):
                    out += fn(requests[i : i + self.chunk], disable_tqdm=True)
                if self.progress is not None:
                    self.progress.advance(task, len(requests[i : i + self.chunk]))
            return out

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
            return self._chunked("loglikelihood", requests, "log-likelihood requests")

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
            return self._chunked("loglikelihood_rolling", requests, "rolling log-likelihood requests")

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
            return self._chunked("generate_until", requests, "generation requests")

        @property
        def eot_token_id(self) -> int:
            """Stop where psft-lite's own generation stops: the chat template's end of turn (lm-eval stops at the
            tokenizer's eos, which for Gemma is `<eos>`, not `<end_of_turn>`: answers ran on into invented turns)."""
            eot = end_of_turn_id(self.tokenizer)
            return eot if eot is not None else super().eot_token_id

    return ProgressLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)


def _quiet_lm_eval() -> None:
    """lm-eval logs every task's set-up at INFO and warns that a pre-loaded model skips its own loading (intended);
    its context-building loop draws a tqdm bar of its own beside psft-lite's (the request bars are off already:
    `disable_tqdm`)."""
    import functools

    import lm_eval.api.task
    from tqdm import tqdm

    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    lm_eval.api.task.tqdm = functools.partial(tqdm, disable=True)


def scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {"metric,filter": value}} of the numbers lm-eval reports (stderrs kept, under their own keys)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        out[task] = {
            k: float(v)
            for k, v in metrics.items()
            if k not in _NOT_SCORES and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
    return out


def evaluate(
    loaded: Any,
    tasks: list[str],
    tm: Any,
    *,
    limit: int | None,
    num_fewshot: int | None,
    chat: bool,
    batch_size: int,
    console: Console,
    label: str,
) -> dict[str, Any]:
    """One harness evaluation of `loaded` as it is (adapter on or off); returns lm-eval's results (no samples)."""
    import lm_eval

    _quiet_lm_eval()
    lm = _progress_lm(loaded, batch_size)
    t0 = time.perf_counter()
    with Progress(
        TextColumn(f"[bold]{label}[/bold] {{task.description}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as progress:
        lm.progress = progress
        try:
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                task_manager=tm,
                limit=limit,
                num_fewshot=num_fewshot,
                apply_chat_template=chat,
                fewshot_as_multiturn=chat,
                log_samples=False,
                bootstrap_iters=1000,
                random_seed=0,
                numpy_random_seed=1234,
                torch_random_seed=1234,
                fewshot_random_seed=1234,
            )
        except KeyboardInterrupt:
            raise Interrupted(
                "stopped by Ctrl-C; nothing was written (the harness keeps no partial results)."
            ) from None
    return {"scores": scores(results or {}), "seconds": time.perf_counter() - t0, "n": (results or {}).get("n-samples")}


def run(
    spec: str,
    tasks: list[str],
    *,
    out_dir: Path | None,
    limit: int | None,
    num_fewshot: int | None,
    include_path: list[Path],
    chat: bool | None,
    compare_base: bool,
    batch_size: int,
    dtype: str | None,
    console: Console,
) -> dict[str, Any]:
    """Evaluate `spec` (and, with `compare_base`, its base) on harness tasks; writes JSON + markdown; returns them."""
    require()
    from psft_lite.model.runtime import offline

    os.environ["HF_DATASETS_OFFLINE"] = "1"  # offline by design, even where there is internet: never a hang
    offline()
    from psft_lite.inference.generate import load_model
    from psft_lite.model.adapters import is_adapter_source

    if compare_base and not (Path(spec).is_dir() and is_adapter_source(Path(spec))):
        raise RecipeError(
            f"--compare-base needs a run directory or an adapter (the base is the model with the adapter disabled); "
            f"{spec} is a plain model. Evaluate the base on its own instead."
        )
    tm = task_manager(tasks, include_path)
    check_task_data(tm, tasks)  # before the model loads: missing data costs seconds, not a model load
    loaded = load_model(spec, dtype)
    use_chat = bool(loaded.tokenizer.chat_template) if chat is None else chat
    common = dict(limit=limit, num_fewshot=num_fewshot, chat=use_chat, batch_size=batch_size, console=console)
    report: dict[str, Any] = {
        "model": str(spec),
        "tasks": tasks,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "chat_template": use_chat,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "model_scores": evaluate(loaded, tasks, tm, label="model", **common),
    }
    if compare_base:
        with loaded.model.disable_adapter():
            report["base_scores"] = evaluate(loaded, tasks, tm, label="base", **common)
    out = out_dir if out_dir is not None else _default_out(spec)
    if out is not None:
        report["files"] = write_report(report, out)
    return report


def parse_tasks(tasks: str) -> list[str]:
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise RecipeError("--tasks: no task named; e.g. --tasks gsm8k,arc_easy")
    return names


def report_lines(report: dict[str, Any]) -> tuple[str, str, list[str]]:
    """(the score table, a one-line note on how it ran, the files written) as `eval --tasks` prints them."""
    seconds = report["model_scores"]["seconds"] + report.get("base_scores", {}).get("seconds", 0.0)
    note = (
        f"harness: {', '.join(report['tasks'])}"
        + (f", limit {report['limit']}" if report["limit"] else "")
        + f", chat template {'on' if report['chat_template'] else 'off'}, {seconds:.0f} s"
    )
    return table(report), note, [f"wrote {f}" for f in report.get("files", [])]


def _default_out(spec: str) -> Path | None:
    """A run directory keeps its harness results in RUN_DIR/eval/; anything else only with --out."""
    p = Path(spec)
    return rundir.eval_dir(p) if rundir.is_run_dir(p) and rundir.metrics_file(p).exists() else None


def _slug(tasks: list[str]) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "+".join(tasks))[:120]


def table(report: dict[str, Any]) -> str:
    """The markdown table: task, metric, model (and base, difference)."""
    model = report["model_scores"]["scores"]
    base = report.get("base_scores", {}).get("scores")
    head = "| task | metric | model |" + (" base | Δ (model − base) |" if base else "")
    lines = [head, "|---|---|---|" + ("---|---|" if base else "")]
    for task, metrics in model.items():
        for key, v in metrics.items():
            if "_stderr" in key:
                continue
            se = metrics.get(key.replace(",", "_stderr,", 1))
            cell = f"{v:.4f}" + (f" ± {se:.4f}" if se is not None and se == se else "")
            row = f"| {task} | {key} | {cell} |"
            if base:
                b = base.get(task, {}).get(key)
                row += f" {b:.4f} | {v - b:+.4f} |" if b is not None else " — | — |"
            lines.append(row)
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path) -> list[str]:
    """`harness-<tasks>.json` and `.md` in `out`, each written to a temporary name and renamed."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"harness-{_slug(report['tasks'])}"
    files = []
    for suffix, text in ((".json", json.dumps(report, indent=2) + "\n"), (".md", table(report))):
        path = stem.with_suffix(suffix)
        atomic_write_text(path, text)
        files.append(str(path))
    return files
