"""Read raw rows from a local file or folder, or a hub data set, each row tagged with where it came from.

Local files are read here rather than through `datasets` so that an error can name the file and line.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psft_lite.core import hub
from psft_lite.core.errors import DataError
from psft_lite.recipe.schema import Source

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


@dataclass(frozen=True)
class Row:
    data: dict[str, Any]
    where: str  # "data/train.jsonl:12" — used in every error about this row


def resolve_local(path: str, base_dir: Path | None = None) -> Path | None:
    """The local file or folder `path` names (relative to the working directory, then to `base_dir`), or None."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    if base_dir is not None and not p.is_absolute() and (base_dir / p).exists():
        return base_dir / p
    return None


def looks_local(path: str) -> bool:
    """A string that can only mean a local path (a hub id has neither a file suffix nor a leading ./, / or ~)."""
    return path.startswith((".", "/", "~")) or path.lower().endswith(LOCAL_SUFFIXES) or path.count("/") > 1


def describe(source: Source) -> str:
    extra = ", ".join(x for x in (source.config, source.split) if x)
    return f"{source.path} ({extra})"


def read_rows(source: Source, limit: int | None = None, base_dir: Path | None = None) -> list[Row]:
    """All rows of `source` (the first `limit` if given). Raises `DataError` naming the file and line."""
    local = resolve_local(source.path, base_dir)
    if local is not None:
        if local.is_dir():
            return _read_dataset_folder(local, source, limit)
        return _read_file(local, limit)
    if looks_local(source.path):
        p = Path(source.path)
        hint = ""
        if p.parent.is_dir():
            near = difflib.get_close_matches(p.name, [c.name for c in p.parent.iterdir()], n=1)
            hint = f" Did you mean {p.parent / near[0]}?" if near else ""
        raise DataError(
            f"{source.path}: data file not found (relative paths are read from the working directory).{hint}"
        )
    return _read_hub(source, limit)


def _read_file(path: Path, limit: int | None) -> list[Row]:
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise DataError(
            f"{path}: unsupported data file type {suffix or '(none)'}; use .jsonl, .json, .parquet or .csv."
        )
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty (0 bytes).")
    reader = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}[suffix]
    rows = reader(path, limit)
    if not rows:
        raise DataError(f"{path}: contains no rows.")
    return rows


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); is it really a {path.suffix} file?") from None


def _read_jsonl(path: Path, limit: int | None) -> list[Row]:
    rows = []
    for lineno, line in enumerate(_text(path).splitlines(), 1):
        if limit is not None and len(rows) >= limit:
            break
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where}: not valid JSON ({e.msg} at column {e.colno}). Each line of a .jsonl file must be one JSON "
                "object; a cut-off last line usually means the file was not completely written."
            ) from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object per line, got {type(obj).__name__}.")
        rows.append(Row(obj, where))
    return rows


def _read_json(path: Path, limit: int | None) -> list[Row]:
    try:
        obj = json.loads(_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}).") from None
    if isinstance(obj, dict):
        lists = [k for k, v in obj.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of objects (or an object holding exactly one such list).")
        obj = obj[lists[0]]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(obj).__name__}.")
    rows = []
    for i, item in enumerate(obj[:limit] if limit else obj):
        if not isinstance(item, dict):
            raise DataError(f"{path}: item {i}: expected a JSON object, got {type(item).__name__}.")
        rows.append(Row(item, f"{path}: item {i}"))
    return rows


def _read_parquet(path: Path, limit: int | None) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e}).") from None
    if limit is not None:
        table = table.slice(0, limit)
    return [Row(r, f"{path}: row {i}") for i, r in enumerate(table.to_pylist())]


def _read_csv(path: Path, limit: int | None) -> list[Row]:
    reader = csv.DictReader(io.StringIO(_text(path), newline=""))  # quoted fields may span lines
    rows = []
    try:
        for r in reader:
            if limit is not None and len(rows) >= limit:
                break
            where = f"{path}:{reader.line_num}"
            if None in r or None in r.values():
                raise DataError(f"{where}: this row has a different number of columns than the header.")
            rows.append(Row(dict(r), where))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({e}).") from None
    return rows


def _rows_from_dataset(ds: Any, label: str, limit: int | None) -> list[Row]:
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    rows = [Row(dict(r), f"{label} row {i}") for i, r in enumerate(ds)]
    if not rows:
        raise DataError(f"{label}: contains no rows.")
    return rows


def _read_dataset_folder(path: Path, source: Source, limit: int | None) -> list[Row]:
    """A `save_to_disk` folder, or a folder laid out like a hub data set repo (data files, optional configs)."""
    import datasets

    label = f"{path} ({source.split})"
    try:
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[source.split]
        else:
            ds = datasets.load_dataset(str(path), name=source.config, split=source.split)
    except KeyError:
        raise DataError(
            f"{path}: has no split {source.split!r}; set data.train.split (or data.eval.split; --split on the command "
            "line)."
        ) from None
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        raise DataError(f"{path}: cannot read this folder as a data set ({e}).") from None
    return _rows_from_dataset(ds, label, limit)


def _read_hub(source: Source, limit: int | None) -> list[Row]:
    offline = hub.unreachable_reason()
    if offline is not None:
        hub.go_offline()  # the local cache only: no minute of retries against an unreachable hub
    import datasets

    label = describe(source)
    try:
        ds = datasets.load_dataset(source.path, name=source.config, split=source.split, revision=source.revision)
    except Exception as e:  # datasets raises many types (network, auth, missing config/split); all are bad input here
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if offline is not None:
            reason = f"it is not in the local cache, and the hub cannot be asked: {offline}"
        raise DataError(
            f"{source.path}: not a local file or folder, and loading it as a Hugging Face Hub data set "
            f"(config={source.config!r}, split={source.split!r}) failed: {reason}. Check the id, the config and split "
            "keys, your network connection and HF_TOKEN for gated data sets."
        ) from None
    return _rows_from_dataset(ds, label, limit)
