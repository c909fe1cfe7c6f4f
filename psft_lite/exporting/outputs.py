"""What a run leaves besides its adapter (`output.save`): the merged model and GGUF files. Training calls `write`
at the end of a run; `psft-lite merge` and `psft-lite export` call the same functions directly.

An output format is a function from a finished run directory to what it wrote, registered in `FORMATS` by name.
The adapter itself is always written by training (it needs the live model), so it is listed but writes nothing
here. Adding a format: a module with its writer and one entry below naming it, or `psft_lite.register_output` from
Python (the recipe reads the names from here when it validates).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from psft_lite.core.lazy import check_name, resolve


@dataclass(frozen=True)
class OutputFormat:
    """A row of the table. `write` and `check` name their functions as "module:function" (or are callables, for a
    format registered from Python), resolved when called: the table imports nothing above `core`, the rule every
    registry the recipe reads follows."""

    name: str
    write: str | Callable[[Path, Any, Console], dict[str, Any]] | None  # (run dir, output section, console) → summary
    check: str | Callable[[str], None] | None = None  # raises a clear error before training when it cannot be written


FORMATS: dict[str, OutputFormat] = {
    "adapter": OutputFormat("adapter", None),
    "merged": OutputFormat("merged", "psft_lite.exporting.merge:write_merged"),
    "gguf": OutputFormat("gguf", "psft_lite.exporting.gguf:write_gguf", "psft_lite.exporting.gguf_check:check_output"),
}


def register(
    name: str,
    write: Callable[[Path, Any, Console], dict[str, Any]],
    check: Callable[[str], None] | None = None,
) -> OutputFormat:
    """Add (or replace) an output format, checked as a built-in row is: a name `output.save` can hold, a callable
    writer and check. The recipe reads the table when it validates, so `save = ["<name>"]` works from then on."""
    check_name("output format", name)
    if name == "adapter":
        raise ValueError("output format 'adapter' is written by training itself and cannot be replaced")
    if not callable(write) or (check is not None and not callable(check)):
        raise ValueError(
            f"output format {name!r}: write must be a function (run_dir, output_section, console) -> summary dict, "
            "and check, if given, a function (where) -> None that raises when the format cannot be written"
        )
    FORMATS[name] = OutputFormat(name, write, check)
    return FORMATS[name]


def check(names: list[str], where: str) -> None:
    """Fail now, not after hours of training, when a requested format cannot be written on this machine."""
    for name in names:
        if FORMATS[name].check is not None:
            resolve(FORMATS[name].check)(where)


def needs_model_memory(names: list[str]) -> bool:
    """Whether any requested format loads a model of its own (so training should free its model first)."""
    return any(FORMATS[n].write is not None for n in names)


def write(run_dir: Path, output: Any, console: Console) -> dict[str, Any]:
    """Write every format `output.save` names, in the registry's order; returns their summary entries."""
    summary: dict[str, Any] = {}
    for name, fmt in FORMATS.items():
        if name in output.save and fmt.write is not None:
            summary.update(resolve(fmt.write)(run_dir, output, console))
    return summary
