"""What a run leaves besides its adapter (`output.save`): the merged model and GGUF files. Training calls `write`
at the end of a run; `psft-lite merge` and `psft-lite export` call the same functions directly.

An output format is a function from a finished run directory to what it wrote, registered in `FORMATS` by name.
The adapter itself is always written by training (it needs the live model), so it is listed but writes nothing
here. Adding a format: a module with its writer, and one entry below (the recipe reads the names from here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from psft_lite.core import rundir


@dataclass(frozen=True)
class OutputFormat:
    name: str
    write: Callable[[Path, Any, Console], dict[str, Any]] | None  # (run dir, output section, console) → summary
    check: Callable[[str], None] | None = None  # raises a clear error before training when it cannot be written


def _merged(run_dir: Path, output: Any, console: Console) -> dict[str, Any]:
    from psft_lite.exporting.merge import merge

    report = merge(rundir.adapter_dir(run_dir), out=rundir.merged_dir(run_dir), console=console)
    return {"merged": str(report["out"])}


def _gguf(run_dir: Path, output: Any, console: Console) -> dict[str, Any]:
    from psft_lite.exporting.gguf import export

    report = export(run_dir, quant=output.gguf_quant, overwrite=True, console=console)
    return {"gguf": [f["path"] for f in report["files"]]}


def _gguf_check(where: str) -> None:
    from psft_lite.exporting import gguf_check

    gguf_check.require(f"{where}: output.save = 'gguf' (the export's check in llama.cpp)")


FORMATS: dict[str, OutputFormat] = {
    "adapter": OutputFormat("adapter", None),
    "merged": OutputFormat("merged", _merged),
    "gguf": OutputFormat("gguf", _gguf, _gguf_check),
}


def check(names: list[str], where: str) -> None:
    """Fail now, not after hours of training, when a requested format cannot be written on this machine."""
    for name in names:
        if FORMATS[name].check is not None:
            FORMATS[name].check(where)


def needs_model_memory(names: list[str]) -> bool:
    """Whether any requested format loads a model of its own (so training should free its model first)."""
    return any(FORMATS[n].write is not None for n in names)


def write(run_dir: Path, output: Any, console: Console) -> dict[str, Any]:
    """Write every format `output.save` names, in the registry's order; returns their summary entries."""
    summary: dict[str, Any] = {}
    for name, fmt in FORMATS.items():
        if name in output.save and fmt.write is not None:
            summary.update(fmt.write(run_dir, output, console))
    return summary
