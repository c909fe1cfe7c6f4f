"""psft-lite: LoRA/QLoRA fine-tuning with trust-region objectives (Proximal SFT, IDFT, DFT), and a verdict on what
each fine-tune cost the model.

    import psft_lite
    run = psft_lite.train("recipes/quickstart.toml")

The public functions (psft_lite.api): `train`, `load`, `evaluate`, `merge`, `export`, `make_recipe`, `ddt`,
`hint`, and the extension calls `register_objective`, `register_output`, `register_tracker`. Importing psft_lite
is cheap and changes nothing: torch and transformers load when a function first needs them.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = [
    "train",
    "load",
    "evaluate",
    "merge",
    "export",
    "make_recipe",
    "ddt",
    "hint",
    "register_objective",
    "register_output",
    "register_tracker",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from psft_lite import api

        return getattr(api, name)
    raise AttributeError(f"module 'psft_lite' has no attribute {name!r}")
