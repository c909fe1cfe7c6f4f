"""Data: sources → chat messages → token ids with trained-token masks → batches.

`load_examples` is the one entry point the commands use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psft_lite.core.errors import DataError
from psft_lite.data.formats import detect_format, to_messages
from psft_lite.data.sources import Row, read_rows
from psft_lite.data.tokenize import EncodeStats, Example, encode_all
from psft_lite.recipe.schema import DataSection, RowFormat, Source

__all__ = [
    "Example",
    "EncodeStats",
    "Row",
    "SourceData",
    "load_examples",
    "encode_conversations",
    "load_conversations",
    "load_sources",
    "resolve_format",
]


def load_conversations(
    source: Source, data: RowFormat, limit: int | None = None, base_dir: Path | None = None
) -> list[tuple[list[dict[str, str]], Row]]:
    """Read `source` and convert every row to chat messages; returns (messages, row) pairs."""
    rows: list[Row] = read_rows(source, limit=limit, base_dir=base_dir)
    fmt, fields = resolve_format(rows, data)
    out = []
    for row in rows:
        if data.format == "auto":
            # a mixed file: say so at the row that differs, instead of a confusing missing-field message
            try:
                other = detect_format(row, data.fields)[0]
            except DataError:
                other = None
            if other is not None and other != fmt:
                raise DataError(
                    f"{row.where}: this row looks like format {other!r} but the first row of the file is {fmt!r}; one "
                    "file must use one format."
                )
        out.append((to_messages(row, fmt, fields, data.system_prompt), row))
    return out


def resolve_format(rows: list[Row], data: RowFormat) -> tuple[str, dict[str, str]]:
    """The format and field mapping for these rows: the recipe's, or detected from the first row."""
    return (data.format, data.fields) if data.format != "auto" else detect_format(rows[0], data.fields)


def load_examples(
    source: Source,
    data: RowFormat,
    tokenizer: Any,
    limit: int | None = None,
    base_dir: Path | None = None,
    progress: Callable[[], None] | None = None,
) -> tuple[list[Example], EncodeStats]:
    """Tokenized examples of `source` with the recipe's length policy. Raises `DataError` if none survive."""
    conversations = load_conversations(source, data, limit=limit, base_dir=base_dir)
    return encode_conversations(conversations, source, data, tokenizer, progress)


def encode_conversations(
    conversations: list[tuple[list[dict[str, str]], Row]],
    source: Source,
    data: RowFormat,
    tokenizer: Any,
    progress: Callable[[], None] | None = None,
) -> tuple[list[Example], EncodeStats]:
    """`load_conversations`' output tokenized (for a caller that read the rows before it had a tokenizer)."""
    pairs = [(m, row.where) for m, row in conversations]
    examples, stats = encode_all(tokenizer, pairs, data.max_length, data.truncation, progress)
    if not examples:
        raise DataError(
            f"{source.path}: none of its {stats.rows} examples fit in data.max_length = {data.max_length} tokens "
            f'(all dropped). Raise data.max_length or set data.truncation = "truncate".'
        )
    return examples, stats


@dataclass
class SourceData:
    """One training source, tokenized: its name in reports (the file name, or hub id) and its examples."""

    name: str
    examples: list[Example]
    stats: EncodeStats


def source_name(path: str) -> str:
    return Path(path).name if Path(path).exists() else path


def load_sources(
    data: DataSection, tokenizer: Any, base_dir: Path | None = None, progress: Callable[[], None] | None = None
) -> list[SourceData]:
    """Every `data.train` source, read in its own format with its own row limit and tokenized."""
    out = []
    for src in data.train:
        rows = data.row_format(src)
        limit = src.limit if src.limit is not None else data.limit
        examples, stats = load_examples(src, rows, tokenizer, limit=limit, base_dir=base_dir, progress=progress)
        out.append(SourceData(source_name(src.path), examples, stats))
    return out


def total_stats(parts: list[EncodeStats]) -> EncodeStats:
    """The statistics of several sources together."""
    out = EncodeStats()
    for s in parts:
        for k in ("rows", "kept", "dropped_too_long", "truncated", "eos_appended", "trained_tokens", "total_tokens"):
            setattr(out, k, getattr(out, k) + getattr(s, k))
        out.max_len = max(out.max_len, s.max_len)
        out.notes += s.notes
    return out
