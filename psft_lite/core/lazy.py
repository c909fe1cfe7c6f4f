"""Functions named as "module:function": how a registry row points at code above its layer without importing it (the
registries' one rule, docs/ARCHITECTURE.md). The import happens when the function is first asked for. And the one
rule for the names rows are registered under."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any


def resolve(ref: str | Callable[..., Any]) -> Callable[..., Any]:
    """The function `ref` names ("package.module:function"), or `ref` itself when it is already callable (a row
    registered from Python)."""
    if callable(ref):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def check_name(what: str, name: Any) -> str:
    """A registry row's name, checked: a recipe holds it as a TOML value, so lowercase letters, digits, underscores."""
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"{what} name {name!r}: use lowercase letters, digits and underscores (it is a TOML value)")
    return name
