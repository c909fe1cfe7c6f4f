"""Functions named as "module:function": how a registry row points at code above its layer without importing it (the
registries' one rule, docs/ARCHITECTURE.md). The import happens when the function is first asked for."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def resolve(ref: str | Callable[..., Any]) -> Callable[..., Any]:
    """The function `ref` names ("package.module:function"), or `ref` itself when it is already callable (a row
    registered from Python)."""
    if callable(ref):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)
