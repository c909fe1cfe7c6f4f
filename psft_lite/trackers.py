"""Live reporting to experiment trackers: TensorBoard, Weights & Biases, MLflow and trackio (`output.report_to`).

The trackers get exactly what metrics.jsonl gets, under the same names: `metrics.MetricsWriter` hands every record it
writes to a `Reporter`, which fans it out. A step record's numbers are logged at its step; an event (eval, guard
warning, skipped step) logs its numbers at its step plus its message as text where the backend has text. At the start
each backend gets the resolved recipe (flattened, `train.lr`) and the data statistics as hyper-parameters; at the end
the run's summary.

Offline first, and the run directory stays the one place a run lives: TensorBoard and trackio write under it, MLflow
uses a SQLite store inside it unless `MLFLOW_TRACKING_URI` says otherwise, W&B writes its files under it and runs
offline unless `WANDB_MODE` says otherwise or an API key is configured (it never prompts for a login).

Resume continues the same tracker run: W&B, MLflow and trackio reuse the run id kept in `trackers.json`, and steps up
to the last one reported before the interruption are not sent again (a resumed run reproduces them exactly);
TensorBoard purges the events past the checkpoint and logs them again, as metrics.jsonl does.

A backend that raises (disk full, server gone) is reported once and dropped; training and metrics.jsonl go on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import netrc
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from psft_lite.errors import RecipeError

#: backend → (the module it needs, the psft-lite extra that installs it)
BACKENDS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}
STATE_FILE = "trackers.json"


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def require(names: list[str], where: str = "output.report_to") -> None:
    """`RecipeError` naming the extra to install when a named backend's package is missing (checked before any model
    loads, so a typo in the environment costs a second, not a model load)."""
    missing = [n for n in names if not installed(BACKENDS[n][0])]
    if missing:
        extras = ",".join(BACKENDS[n][1] for n in missing)
        raise RecipeError(
            f"{where} names {', '.join(missing)}, but {'its package is' if len(missing) == 1 else 'their packages are'}"
            f" not installed. Install {'it' if len(missing) == 1 else 'them'} with: pip install 'psft-lite[{extras}]' "
            f"(or remove {', '.join(missing)} from {where})."
        )


# ---------------------------------------------------------------------------------------------------------------------
# What a backend is asked to do


class Backend(Protocol):
    name: str

    def start(self, config: dict[str, Any]) -> None: ...

    def scalars(self, values: dict[str, float], step: int) -> None: ...

    def text(self, tag: str, message: str, step: int) -> None: ...

    def finish(self, summary: dict[str, Any], status: str, step: int) -> None: ...


def flat_config(recipe_dump: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`{"train": {"lr": 1e-3}}` → `{"train.lr": 1e-3}`; lists and tables become strings (every tracker takes those)."""
    out: dict[str, Any] = {}
    for section, values in recipe_dump.items():
        for key, v in values.items():
            out[f"{section}.{key}"] = v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
    out.update(extra)
    return out


def _summary_text(summary: dict[str, Any]) -> str:
    return "\n".join(f"- {k}: {v}" for k, v in summary.items())


class TensorBoard:
    """`torch.utils.tensorboard` into RUN_DIR/tensorboard; on resume, events past the checkpoint are purged."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, state: dict[str, Any], start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops events at steps >= it that an earlier writer left (records are 1-based)
        purge = start_step + 1 if start_step else None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge, flush_secs=10)

    def start(self, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        self.writer.add_text("recipe", "\n".join(f"    {k} = {v}" for k, v in config.items()))
        exp, ssi, sei = hparams(config, {})
        for summ in (exp, ssi, sei):
            self.writer.file_writer.add_summary(summ)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def text(self, tag: str, message: str, step: int) -> None:
        self.writer.add_text(tag, message, step)

    def finish(self, summary: dict[str, Any], status: str, step: int) -> None:
        self.writer.add_text("summary", f"status: {status}\n\n" + _summary_text(summary), step)
        self.writer.close()


def _wandb_mode() -> str:
    """`WANDB_MODE` when set; online only when an API key is configured (environment or ~/.netrc); else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    with contextlib.suppress(OSError, netrc.NetrcParseError):
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
        if netrc.netrc().authenticators(host):
            return "online"
    return "offline"


class Wandb:
    """A W&B run with its files under RUN_DIR/wandb; its id is kept so a resumed run continues it."""

    name = "wandb"

    def __init__(self, run_dir: Path, state: dict[str, Any], project: str):
        self.run_dir, self.state, self.project = run_dir, state, project
        self.run: Any = None

    def start(self, config: dict[str, Any]) -> None:
        import wandb

        if "id" not in self.state:
            self.state["id"] = secrets.token_hex(4)  # W&B run ids are short lowercase alphanumerics
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", self.project),
            name=self.run_dir.name,
            id=self.state["id"],
            dir=str(self.run_dir),
            config=config,
            resume="allow",
            mode=_wandb_mode(),
            settings=wandb.Settings(console="off", silent=True),
        )
        self.state["mode"] = self.run.settings.mode

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def text(self, tag: str, message: str, step: int) -> None:
        self.run.log({tag: message}, step=step)

    def finish(self, summary: dict[str, Any], status: str, step: int) -> None:
        self.run.summary.update({f"summary/{k}": v for k, v in summary.items()})
        self.run.finish(exit_code=0 if status == "finished" else 1)


class Mlflow:
    """An MLflow run in the store `MLFLOW_TRACKING_URI` names, else a SQLite store RUN_DIR/mlflow.db (artifacts in
    RUN_DIR/mlflow-artifacts); its run id is kept so a resumed run continues it."""

    name = "mlflow"
    STATUS = {"finished": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}

    def __init__(self, run_dir: Path, state: dict[str, Any], project: str):
        self.run_dir, self.state = run_dir, state
        self.experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", project)
        self.client: Any = None

    def start(self, config: dict[str, Any]) -> None:
        import logging

        from mlflow import MlflowClient
        from mlflow.entities import Param

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # it logs its database set-up at INFO (after import)
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(self.run_dir / 'mlflow.db').resolve()}"
        self.state["tracking_uri"] = uri
        self.client = MlflowClient(tracking_uri=uri)
        if "run_id" in self.state:
            self.client.update_run(self.state["run_id"], status="RUNNING")
        else:
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is not None:
                exp_id = exp.experiment_id
            else:
                local = None if os.environ.get("MLFLOW_TRACKING_URI") else (self.run_dir / "mlflow-artifacts").resolve()
                exp_id = self.client.create_experiment(self.experiment, artifact_location=local and local.as_uri())
            run = self.client.create_run(exp_id, run_name=self.run_dir.name)
            self.state["run_id"] = run.info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in config.items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.state["run_id"], params=params[i : i + 100])

    def scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.state["run_id"], metrics=[Metric(k, v, ts, step) for k, v in values.items()])

    def text(self, tag: str, message: str, step: int) -> None:
        self.client.log_text(self.state["run_id"], f"step {step}: {message}\n", f"events/{tag}-step-{step}.txt")

    def finish(self, summary: dict[str, Any], status: str, step: int) -> None:
        run_id = self.state["run_id"]
        numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for k, v in numbers.items():
            self.client.log_metric(run_id, f"summary/{k}", float(v))
        for k, v in summary.items():
            if k not in numbers:
                self.client.set_tag(run_id, f"summary.{k}", str(v))
        self.client.set_terminated(run_id, status=self.STATUS[status])


def _quiet() -> Any:
    """trackio prints its set-up and alert lines to stdout, which psft-lite keeps for results; the where-to-look line
    at the end of the run and the progress display say the same."""
    return contextlib.redirect_stdout(io.StringIO())


class Trackio:
    """A trackio run in the store `TRACKIO_DIR` names, else RUN_DIR/trackio; resumed by name."""

    name = "trackio"

    def __init__(self, run_dir: Path, state: dict[str, Any], project: str):
        self.run_dir, self.state, self.project = run_dir, state, project
        self.run: Any = None

    def start(self, config: dict[str, Any]) -> None:
        # trackio reads TRACKIO_DIR once, when it is first imported; a later run in the same process (a study) logs
        # where the first one did, and the state file records where that is
        if "trackio" not in sys.modules and not os.environ.get("TRACKIO_DIR"):
            os.environ["TRACKIO_DIR"] = str((self.run_dir / "trackio").resolve())
            try:
                import trackio
            finally:
                del os.environ["TRACKIO_DIR"]
        import trackio
        from trackio.utils import TRACKIO_DIR

        self.state.update(project=self.project, name=self.run_dir.name, dir=str(TRACKIO_DIR))
        with _quiet():
            self.run = trackio.init(
                project=self.project,
                name=self.run_dir.name,
                config=config,
                resume="allow",
                auto_log_cpu=False,
                auto_log_gpu=False,
            )

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def text(self, tag: str, message: str, step: int) -> None:
        from trackio import AlertLevel

        with _quiet():
            self.run.alert(title=tag, text=message, level=AlertLevel.WARN, step=step)

    def finish(self, summary: dict[str, Any], status: str, step: int) -> None:
        import trackio

        with _quiet():
            numbers = {f"summary/{k}": float(v) for k, v in summary.items() if _is_number(v)}
            if numbers:  # on the last step, not a step of its own
                self.run.log(numbers, step=step)
            trackio.finish()  # the module-level finish also forgets the run, so its exit hook does not finish it again


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ---------------------------------------------------------------------------------------------------------------------
# The fan-out


class Reporter:
    """Sends each metrics record to every backend. A backend that raises is reported once and dropped.

    `reported_through`: the last step the backends already have from before a resume (W&B, MLflow and trackio skip
    records up to it; TensorBoard purged them and takes them again)."""

    def __init__(
        self,
        backends: list[Backend],
        warn: Any,
        reported_through: int = 0,
        state_path: Path | None = None,
        state: dict[str, dict[str, Any]] | None = None,
    ):
        self.backends = backends
        self.warn = warn
        self.reported_through = reported_through
        self.step = reported_through  # the last step seen
        self.state_path = state_path
        self.state = state if state is not None else {}  # per backend: what resuming needs (run ids, store)

    def _call(self, backend: Backend, what: str, *args: Any) -> None:
        if backend not in self.backends:
            return
        try:
            getattr(backend, what)(*args)
        except Exception as e:  # a tracker must never stop training  # noqa: BLE001
            self.backends.remove(backend)
            self.warn(
                f"reporting to {backend.name} failed ({type(e).__name__}: {str(e).strip()[:300]}); training goes on "
                f"without it, and metrics.jsonl stays complete."
            )

    def _again(self, backend: Backend, step: int) -> bool:
        return backend.name != "tensorboard" and step <= self.reported_through

    def start(self, config: dict[str, Any]) -> None:
        for b in list(self.backends):
            self._call(b, "start", config)
        self.save_state()

    def record(self, rec: dict[str, Any]) -> None:
        """One metrics.jsonl record: a step (numbers at its step) or an event (its numbers and its message)."""
        step = int(rec.get("step", 0))
        self.step = max(self.step, step)
        event = rec.get("event")
        values = {k: float(v) for k, v in rec.items() if k not in ("step", "event") and _is_number(v)}
        if event is not None and event != "eval":
            values = {f"{event}/{k}": v for k, v in values.items()}
            values[f"events/{event}"] = 1.0  # a marker on the step the event happened
        for b in list(self.backends):
            if self._again(b, step):
                continue
            self._call(b, "scalars", values, step)
            if event is not None and "message" in rec:
                self._call(b, "text", event, str(rec["message"]), step)

    def finish(self, summary: dict[str, Any], status: str) -> None:
        for b in list(self.backends):
            self._call(b, "finish", summary, status, self.step)
        self.backends = []
        self.save_state()

    def save_state(self) -> None:
        if self.state_path is None or not self.state:
            return
        tmp = self.state_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.state, indent=1), encoding="utf-8")
        os.replace(tmp, self.state_path)


def open_reporter(
    names: list[str], project: str, run_dir: Path, start_step: int, reported_through: int, warn: Any
) -> Reporter:
    """The backends `names` asks for, with the state a resumed run left in RUN_DIR/trackers.json."""
    path = run_dir / STATE_FILE
    state: dict[str, dict[str, Any]] = {}
    if start_step and path.is_file():
        with contextlib.suppress(json.JSONDecodeError, OSError):
            state = json.loads(path.read_text(encoding="utf-8"))
    reporter = Reporter([], warn, reported_through, path, state)
    for name in names:
        own = state.setdefault(name, {})
        try:
            if name == "tensorboard":
                backend: Backend = TensorBoard(run_dir, own, start_step)
            elif name == "wandb":
                backend = Wandb(run_dir, own, project)
            elif name == "mlflow":
                backend = Mlflow(run_dir, own, project)
            else:
                backend = Trackio(run_dir, own, project)
        except Exception as e:  # noqa: BLE001
            warn(f"could not start reporting to {name} ({type(e).__name__}: {e}); training goes on without it.")
            continue
        reporter.backends.append(backend)
    return reporter


def where(names: list[str], project: str, run_dir: Path, state: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """One line per backend saying where its data is and how to look at it."""
    lines = []
    for name in names:
        s = (state or {}).get(name, {})
        if name == "tensorboard":
            lines.append(f"tensorboard: tensorboard --logdir {run_dir / 'tensorboard'}")
        elif name == "wandb":
            mode = s.get("mode", "offline")
            lines.append(
                f"wandb ({mode}): {run_dir / 'wandb'}"
                + (f" — upload with: wandb sync {run_dir / 'wandb'}/offline-run-*" if mode == "offline" else "")
            )
        elif name == "mlflow":
            uri = s.get("tracking_uri", f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
            lines.append(f"mlflow: mlflow ui --backend-store-uri {uri}")
        else:
            lines.append(f"trackio: TRACKIO_DIR={s.get('dir', run_dir / 'trackio')} trackio show --project {project}")
    return lines
