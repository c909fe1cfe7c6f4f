"""Read back what a run reported, with each tracker's own reader: step → value per key, every logged point kept (so a
step logged twice shows up twice)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

Points = dict[str, list[tuple[int, float]]]


def tensorboard(run_dir: Path) -> tuple[Points, dict[str, list[tuple[int, str]]]]:
    """Scalars and texts through TensorBoard's event accumulator (which applies purges, as TensorBoard's UI does)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    texts: dict[str, list[tuple[int, str]]] = {}
    for tag in acc.Tags()["tensors"]:
        if tag.endswith("/text_summary"):
            texts[tag.removesuffix("/text_summary")] = [
                (e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)
            ]
    return scalars, texts


def _wandb_records(path: Path) -> Any:
    """The records of a W&B transaction log (run-<id>.wandb): W&B's header, then LevelDB-log framing (32 KiB blocks;
    each chunk: crc32, length, type FULL/FIRST/MIDDLE/LAST) around W&B's own protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert raw[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        buf += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def wandb(run_dir: Path) -> tuple[Points, dict[str, Any], list[str]]:
    """History points (by `_step`), the config and the run ids of every offline segment under RUN_DIR/wandb."""
    points: Points = defaultdict(list)
    config: dict[str, Any] = {}
    ids = []
    for f in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for rec in _wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                ids.append(rec.run.run_id)
                config.update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
            elif kind == "config":
                config.update({u.key: json.loads(u.value_json) for u in rec.config.update})
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                step = int(row.pop("_step"))
                for k, v in row.items():
                    if not k.startswith("_"):
                        points[k].append((step, v))
    return dict(points), config, ids


def mlflow(run_dir: Path) -> tuple[Points, dict[str, str], dict[str, str], str]:
    """Metric histories, params and tags through `MlflowClient`, and the run's status."""
    from mlflow import MlflowClient

    state = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    run = client.get_run(state["run_id"])
    points = {k: [(m.step, m.value) for m in client.get_metric_history(state["run_id"], k)] for k in run.data.metrics}
    return points, run.data.params, run.data.tags, run.info.status


_TRACKIO_READ = """
import json, sys
from trackio.sqlite_storage import SQLiteStorage
logs = SQLiteStorage.get_logs(sys.argv[1], sys.argv[2])
alerts = SQLiteStorage.get_alerts(sys.argv[1], run_name=sys.argv[2])
print(json.dumps({"logs": logs, "alerts": alerts}, default=str))
"""


def trackio(run_dir: Path) -> tuple[Points, list[dict[str, Any]]]:
    """Logged points and alerts through trackio's own `SQLiteStorage`, in a fresh process (trackio reads its store
    folder, TRACKIO_DIR, once at import)."""
    state = json.loads((run_dir / "trackers.json").read_text())["trackio"]
    env = {**os.environ, "TRACKIO_DIR": state["dir"]}
    out = subprocess.run(
        [sys.executable, "-c", _TRACKIO_READ, state["project"], state["name"]],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    data = json.loads(out.stdout.strip().splitlines()[-1])
    points: Points = defaultdict(list)
    for row in data["logs"]:
        step = int(row["step"])
        for k, v in row.items():
            if k not in ("step", "timestamp") and isinstance(v, (int, float)) and not isinstance(v, bool):
                points[k].append((step, float(v)))
    return dict(points), data["alerts"]
