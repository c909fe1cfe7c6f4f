"""A GGUF file's metadata, read from its header without parsing the tensors.

gguf.GGUFReader builds a numpy view for every part of every field before returning any: for Gemma 3's 262k-token
vocabulary that takes ~20 s on this CPU, paid by each export and each adapter check. Reading the key/value section
straight, with numeric arrays as one numpy read, takes well under a second."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

# GGUF metadata value types (gguf.GGUFValueType): fixed-size ones by their little-endian struct format
STRING, ARRAY = 8, 9
_FIXED = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


# (key, value, value type, element type of an array or None): what gguf.GGUFWriter.add_key_value takes
Field = tuple[str, Any, int, "int | None"]


def _read(f: BinaryIO, fmt: str) -> Any:
    return struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]


def _string(f: BinaryIO) -> str:
    return f.read(_read(f, "Q")).decode("utf-8", "replace")


def _value(f: BinaryIO, vtype: int, keep: bool) -> tuple[Any, int | None]:
    """The value (None when not kept: only skipped over) and, for an array, its element type."""
    if vtype == STRING:
        if not keep:  # skipped (e.g. the 262k tokens of a field nobody asked for): seek past, decode nothing
            f.seek(_read(f, "Q"), 1)
            return None, None
        return _string(f), None
    if vtype != ARRAY:
        return _read(f, _FIXED[vtype]), None
    elem, count = _read(f, "I"), _read(f, "Q")
    if elem in _FIXED:
        dtype = np.dtype("<" + _FIXED[elem])
        if not keep:
            f.seek(count * dtype.itemsize, 1)
            return None, elem
        return np.frombuffer(f.read(count * dtype.itemsize), dtype=dtype).tolist(), elem
    items = [_value(f, elem, keep)[0] for _ in range(count)]
    return (items if keep else None), elem


def fields(path: Path, keep: Callable[[str], bool] = lambda key: True, stop_at: str | None = None) -> Iterator[Field]:
    """The kept metadata fields in file order; reading stops after `stop_at` when it is given."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        _read(f, "I"), _read(f, "Q")  # version, tensor count
        for _ in range(_read(f, "Q")):
            key = _string(f)
            vtype = _read(f, "I")
            wanted = keep(key) or key == stop_at
            value, sub = _value(f, vtype, wanted)
            if wanted:
                yield key, value, vtype, sub
            if key == stop_at:
                return


def value(path: Path, key: str) -> Any:
    """One metadata value (None when the file has no such key)."""
    for field in fields(path, keep=lambda k: k == key, stop_at=key):
        return field[1]
    return None
