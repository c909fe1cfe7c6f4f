"""Recipe errors as the user wrote the recipe: pydantic's error locations mapped back to TOML keys and lines.

pydantic reports `('data', 'train', 'function-after[...]', 'path')`; the user wrote `data.train.path` on line 12 of
their file. Every problem of a file is listed at once, one line each, with a "did you mean" for misspelt keys.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from pydantic import BaseModel, ValidationError


def did_you_mean(word: str, options: Any) -> str:
    near = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that holds the field at `loc` (for did-you-mean on unknown keys)."""
    model: Any = root
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


def _node(annotation: Any) -> Any:
    """What a field holds, for walking an error location: a model class, ("dict", value node), or None."""
    origin = getattr(annotation, "__origin__", None)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if origin is dict:
        return ("dict", _node(annotation.__args__[1]))
    for arg in getattr(annotation, "__args__", ()):  # unions: the model member, if any
        node = _node(arg)
        if node is not None:
            return node
    return None


def _clean_loc(root: type[BaseModel], loc: tuple[Any, ...], kind: str) -> tuple[str, ...]:
    """The user's key path of a pydantic error location, without pydantic's union-member tags."""
    out: list[str] = []
    node: Any = root
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, type) and issubclass(node, BaseModel):
            if isinstance(part, str) and part in node.model_fields:
                out.append(part)
                node = _node(node.model_fields[part].annotation)
            elif last and kind == "extra_forbidden":
                out.append(str(part))
        elif isinstance(node, tuple):  # a dict field: this part is the user's key
            out.append(str(part))
            node = node[1]
        else:
            break  # inside a plain value (list items, union tags): the path so far names the key
    return tuple(out)


def _line_of(text: str | None, loc: tuple[str, ...]) -> int | None:
    """Best-effort line number of `section.key` in the TOML text."""
    if not text or not loc:
        return None
    lines = text.splitlines()
    section, key = (loc[0], loc[1]) if len(loc) > 1 else (None, loc[0])
    current = None
    for i, line in enumerate(lines, 1):
        s = line.strip()
        m = re.match(r"^\[([^\]]+)\]", s)
        if m:
            current = m.group(1).strip()
            continue
        m = re.match(r"^([A-Za-z0-9_.\-\"]+)\s*=", s)
        if not m:
            continue
        name = m.group(1).strip('"')
        if section is None and current is None and name == key:
            return i
        if current == section and name == key:
            return i
        if current is None and name in (f"{section}.{key}",):
            return i
    return None


def format_validation_error(e: ValidationError, root: type[BaseModel], source: str, text: str | None) -> str:
    """One line per problem key — `recipe.toml:12: train.lr: must be > 0 (got -1)` — under one heading."""
    problems: dict[tuple[str, ...], list[str]] = {}
    got: dict[tuple[str, ...], str] = {}
    for err in e.errors():
        kind = err["type"]
        loc = _clean_loc(root, err["loc"], kind)
        if kind == "extra_forbidden":
            parent = _model_at(root, loc[:-1])
            hint = did_you_mean(loc[-1], parent.model_fields) if parent and loc else ""
            msg = f"unknown key{hint}"
        elif kind == "missing":
            msg = "required but missing"
        elif kind == "value_error":
            msg = str(err.get("ctx", {}).get("error", err["msg"]))
        else:
            msg = err["msg"][0].lower() + err["msg"][1:]
            if "input" in err and not isinstance(err["input"], dict):
                got[loc] = f" (got {err['input']!r})"
        problems.setdefault(loc, [])
        if msg not in problems[loc]:
            problems[loc].append(msg)
    lines = []
    for loc, msgs in problems.items():
        where = ".".join(loc)
        line = _line_of(text, loc)
        prefix = f"{source}:{line}" if line else source
        what = " or ".join(msgs) + got.get(loc, "")
        lines.append(f"  {prefix}: {where}: {what}" if where else f"  {prefix}: {what}")
    n = len(lines)
    head = f"{source}: {n} problem{'s' if n > 1 else ''} in the recipe:"
    return (
        head
        + "\n"
        + "\n".join(lines)
        + "\nFix these keys (see `psft-lite validate --help` and the README's recipe reference)."
    )
