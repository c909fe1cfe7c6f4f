"""Map every supported row format onto one internal form: a list of chat messages `{"role", "content"}`.

Formats (field names can be remapped with `data.fields`):
- `prompt_completion`: `prompt` (string or messages) and `completion` (string or assistant messages), optional `system`;
- `messages`: `messages` = [{"role", "content"}, ...] (OpenAI / TRL conversational);
- `alpaca`: `instruction`, optional `input`, `output`, optional `system`;
- `sharegpt`: `conversations` = [{"from": "human"|"gpt"|"system", "value"}, ...].
"""

from __future__ import annotations

from typing import Any

from psft_lite.core.errors import DataError
from psft_lite.data.sources import Row
from psft_lite.recipe.schema import FORMAT_FIELDS

Message = dict[str, str]  # the one internal form of a chat turn: {"role", "content"}

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    "system": "system",
    "tool": "tool",
}


def field_names(fmt: str, overrides: dict[str, str]) -> dict[str, str]:
    names = dict(FORMAT_FIELDS[fmt])
    names.update({k: v for k, v in overrides.items() if k in names})
    return names


#: Column pairs auto-detection maps onto prompt_completion (GSM8K's question/answer, MATH's problem/solution, ...).
PROMPT_ALIASES = ("question", "query", "problem")
COMPLETION_ALIASES = ("answer", "response", "solution")


def detect_format(row: Row, overrides: dict[str, str]) -> tuple[str, dict[str, str]]:
    """Guess the format from one row's keys; returns it with the field mapping to use (aliases filled in)."""
    keys = set(row.data)
    required = {
        "messages": ["messages"],
        "sharegpt": ["conversations"],
        "alpaca": ["instruction", "output"],
        "prompt_completion": ["prompt", "completion"],
    }
    for fmt, logical in required.items():
        names = field_names(fmt, overrides)
        if all(names[k] in keys for k in logical):
            return fmt, overrides
    prompt = next((k for k in PROMPT_ALIASES if k in keys), None)
    completion = next((k for k in COMPLETION_ALIASES if k in keys), None)
    if prompt and completion and not overrides:
        return "prompt_completion", {"prompt": prompt, "completion": completion}
    shown = ", ".join(sorted(map(str, keys))[:8]) or "none"
    raise DataError(
        f"{row.where}: cannot tell the data format from this row's fields ({shown}). Set data.format to one of "
        "prompt_completion, messages, alpaca, sharegpt, and map your column names with data.fields, e.g. "
        'data.fields = {prompt = "question", completion = "answer"}.'
    )


def to_messages(row: Row, fmt: str, overrides: dict[str, str], system_prompt: str | None = None) -> list[Message]:
    """The chat messages of one row. Raises `DataError` naming the row and field for anything malformed."""
    names = field_names(fmt, overrides)
    convert = {"prompt_completion": _prompt_completion, "messages": _messages, "alpaca": _alpaca, "sharegpt": _sharegpt}
    messages = convert[fmt](row, names)
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise DataError(f"{row.where}: no non-empty assistant response to train on.")
    return messages


def _get(row: Row, name: str, fmt: str, logical: str, required: bool = True) -> Any:
    if name not in row.data or row.data[name] is None:
        if not required:
            return None
        have = ", ".join(sorted(map(str, row.data))[:8]) or "none"
        raise DataError(
            f"{row.where}: missing field {name!r} (format {fmt}; this row has: {have}). If your column has another "
            f'name, map it with data.fields.{logical} = "<column>".'
        )
    return row.data[name]


def _text(row: Row, value: Any, name: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{row.where}: field {name!r} must be a string, got {type(value).__name__}.")


def _system(row: Row, names: dict[str, str], fmt: str) -> list[Message]:
    s = _get(row, names["system"], fmt, "system", required=False)
    return [{"role": "system", "content": _text(row, s, names["system"])}] if s else []


def _message_list(
    row: Row, value: Any, name: str, role_key: str, content_key: str, roles: dict[str, str] | None
) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{row.where}: field {name!r} must be a non-empty list of messages.")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or role_key not in m or content_key not in m:
            raise DataError(f"{row.where}: {name}[{i}] must be an object with {role_key!r} and {content_key!r}.")
        role = m[role_key]
        if roles is not None:
            if role not in roles:
                raise DataError(f"{row.where}: {name}[{i}]: unknown speaker {role!r}; expected one of {sorted(roles)}.")
            role = roles[role]
        elif role not in ("system", "user", "assistant", "tool"):
            raise DataError(
                f"{row.where}: {name}[{i}]: unknown role {role!r}; expected system, user, assistant or tool."
            )
        content = m[content_key]
        if isinstance(content, list):  # OpenAI-style content parts: keep the text parts
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise DataError(f"{row.where}: {name}[{i}]: only text content is supported.")
            content = "".join(p.get("text", "") for p in content)
        out.append({"role": role, "content": _text(row, content, f"{name}[{i}].{content_key}")})
    return out


def _prompt_completion(row: Row, names: dict[str, str]) -> list[Message]:
    fmt = "prompt_completion"
    prompt = _get(row, names["prompt"], fmt, "prompt")
    completion = _get(row, names["completion"], fmt, "completion")
    msgs = _system(row, names, fmt)
    if isinstance(prompt, list):
        msgs += _message_list(row, prompt, names["prompt"], "role", "content", None)
    else:
        msgs.append({"role": "user", "content": _text(row, prompt, names["prompt"])})
    if isinstance(completion, list):
        msgs += _message_list(row, completion, names["completion"], "role", "content", None)
    else:
        msgs.append({"role": "assistant", "content": _text(row, completion, names["completion"])})
    return msgs


def _messages(row: Row, names: dict[str, str]) -> list[Message]:
    value = _get(row, names["messages"], "messages", "messages")
    return _message_list(row, value, names["messages"], names["role"], names["content"], None)


def _alpaca(row: Row, names: dict[str, str]) -> list[Message]:
    fmt = "alpaca"
    instruction = _text(row, _get(row, names["instruction"], fmt, "instruction"), names["instruction"])
    extra = _get(row, names["input"], fmt, "input", required=False)
    output = _text(row, _get(row, names["output"], fmt, "output"), names["output"])
    prompt = f"{instruction}\n\n{_text(row, extra, names['input'])}" if extra else instruction
    return _system(row, names, fmt) + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _sharegpt(row: Row, names: dict[str, str]) -> list[Message]:
    value = _get(row, names["conversations"], "sharegpt", "conversations")
    msgs = _message_list(row, value, names["conversations"], names["from"], names["value"], SHAREGPT_ROLES)
    return _system(row, names, "sharegpt") + msgs


def with_response(data: dict[str, Any], fmt: str, overrides: dict[str, str], text: str) -> dict[str, Any]:
    """A copy of a row whose final assistant response is replaced by `text`, in the row's own format."""
    import copy

    names = field_names(fmt, overrides)
    row = copy.deepcopy(data)
    if fmt == "prompt_completion":
        key = names["completion"]
        if isinstance(row[key], list):
            row[key][-1]["content"] = text
        else:
            row[key] = text
    elif fmt == "alpaca":
        row[names["output"]] = text
    else:
        list_key, role_key, content_key = (
            (names["messages"], names["role"], names["content"])
            if fmt == "messages"
            else (names["conversations"], names["from"], names["value"])
        )
        turns = row[list_key]
        last = max(i for i, m in enumerate(turns) if SHAREGPT_ROLES.get(m[role_key], m[role_key]) == "assistant")
        turns[last][content_key] = text
    return row
