"""MLflow: a SQLite store inside the run directory unless MLFLOW_TRACKING_URI names another."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


class Mlflow:
    """An MLflow run in the store `MLFLOW_TRACKING_URI` names, else a SQLite store RUN_DIR/mlflow.db (artifacts in
    RUN_DIR/mlflow-artifacts); its run id is kept so a resumed run continues it."""

    name = "mlflow"
    module = "mlflow"
    extra = "mlflow"  # pip install 'psft-lite[mlflow]'
    replays_resumed_steps = False
    STATUS = {"finished": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}

    @classmethod
    def open(cls, run_dir: Path, state: dict[str, Any], project: str, start_step: int) -> Mlflow:
        return cls(run_dir, state, project)

    @staticmethod
    def where(run_dir: Path, project: str, state: dict[str, Any]) -> str:
        uri = state.get("tracking_uri", f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
        return f"mlflow: mlflow ui --backend-store-uri {uri}"

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
