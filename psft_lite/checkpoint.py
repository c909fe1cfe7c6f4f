"""Everything a run writes that must never be half-written: the adapter folder and checkpoints.

A folder is written as `<name>.tmp-XXXX/`, its files fsynced, then renamed into place in one `os.replace`; a crash
mid-write leaves the previous version intact and a `.tmp-` folder that is never mistaken for the real one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from psft_lite import __version__

ADAPTER_META = "psft_lite.json"  # beside adapter_config.json: how the base was loaded, for merge/eval/generate


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it replaces `final` atomically, on failure it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any other folder
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if final.exists():
            old = final.parent / f"{final.name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_adapter(model: Any, tokenizer: Any, path: Path, meta: dict[str, Any]) -> Path:
    """A plain PEFT adapter folder (loadable by `PeftModel.from_pretrained`) with the tokenizer and chat template."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / ADAPTER_META).write_text(json.dumps({"psft_lite_version": __version__, **meta}, indent=2) + "\n")
    return path


def read_adapter_meta(path: Path) -> dict[str, Any] | None:
    p = Path(path) / ADAPTER_META
    return json.loads(p.read_text()) if p.is_file() else None
