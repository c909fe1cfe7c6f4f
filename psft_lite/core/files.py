"""Writing files so that a crash never leaves a half-written one in place.

A folder is written as `<name>.tmp-XXXX/`, its files fsynced, then renamed into place with one `os.replace`; a single
file is written beside its target under a hidden temporary name and renamed the same way. Either the old version or
the complete new one is there afterwards, and a leftover temporary name is never mistaken for the real thing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

TMP_MARK = ".tmp-"  # in the name of a folder or file that is still being written
OLD_MARK = ".old-"  # in the name of a replaced folder about to be removed


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
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
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}{TMP_MARK}", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any other folder
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if final.exists():
            old = final.parent / f"{final.name}{OLD_MARK}{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def partial_name(path: Path) -> Path:
    """The hidden name a file is written under before it is renamed to `path` (removed again on failure)."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; whatever is written there replaces `path` on success."""
    path = Path(path)
    tmp = partial_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` through a temporary file and one rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
