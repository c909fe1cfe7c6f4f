"""Chat messages → token ids plus a mask of trained tokens.

The conversation is rendered with the tokenizer's own chat template. Each assistant turn's text is located by
rendering the conversation up to that turn with `add_generation_prompt=True` (exactly the prompt `generate` will see)
and the conversation including it. The text is then tokenized segment by segment — prompt segments untrained,
assistant segments trained — so a trained span starts exactly where generation starts at inference.

Every assistant token is trained, including the end-of-turn token (`<|im_end|>`, `<|eot_id|>`, ...): masks are built
from positions, never from token ids, so pad == eos cannot hide it. Whitespace the template puts after the end-of-turn
token is not trained. If a template ends turns with no special token, the tokenizer's eos token is appended and trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from psft_lite.core.errors import DataError, ModelError
from psft_lite.data.formats import Message


@dataclass
class Example:
    ids: np.ndarray  # int32 [L]
    mask: np.ndarray  # bool [L]: True where the token is a training target
    where: str
    segments: tuple[int, ...] = ()  # a packed row: the lengths of the examples in it (empty: one example)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_trained(self) -> int:
        return int(self.mask.sum())

    @property
    def n_sequences(self) -> int:
        return len(self.segments) or 1


@dataclass
class EncodeStats:
    rows: int = 0
    kept: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    eos_appended: int = 0
    trained_tokens: int = 0
    total_tokens: int = 0
    max_len: int = 0
    notes: list[str] = field(default_factory=list)


def pad_eos_note(tokenizer: Any) -> str | None:
    """Said once per run (train, validate) when pad == eos: elsewhere a cause of models that never stop."""
    if tokenizer.pad_token_id != tokenizer.eos_token_id:
        return None
    return (
        f"pad token = eos token ({tokenizer.eos_token}); masks are built from positions, so the end-of-turn token is "
        "still trained."
    )


def render(tokenizer: Any, messages: list[Message], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def check_chat_template(tokenizer: Any, name: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"the tokenizer of {name} has no chat template, so prompts and responses cannot be rendered the way the "
            "model will see them at inference. Use an instruct/chat model, or set model.chat_template to a Jinja "
            'template (or to "chatml" for the common <|im_start|>/<|im_end|> format).'
        )


def _segments(tokenizer: Any, messages: list[Message], where: str) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, trained) segments that concatenate to the full rendering."""
    try:
        full = render(tokenizer, messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
            upto = render(tokenizer, messages[: i + 1])
            spans.append((prompt, upto))
    except Exception as e:  # jinja raises TemplateError / exceptions from `raise_exception` in templates
        raise DataError(f"{where}: the model's chat template rejected this conversation: {e}") from None
    consistent = all(full.startswith(upto) and upto.startswith(prompt) for prompt, upto in spans)
    if not consistent:
        # Templates that rewrite earlier turns (e.g. drop past reasoning) only agree on the last turn: train that one.
        prompt, upto = spans[-1]
        if not (full == upto and upto.startswith(prompt)) or messages[-1]["role"] != "assistant":
            raise DataError(
                f"{where}: the chat template renders this conversation differently turn by turn, so the assistant "
                "tokens cannot be located. End each conversation with the assistant turn to train."
            )
        spans = [spans[-1]]
    segments: list[tuple[str, bool]] = []
    pos = 0
    for prompt, upto in spans:
        start, end = len(prompt), len(upto)
        if start < pos:
            continue
        body = full[start:end]
        trimmed = body.rstrip()
        segments.append((full[pos:start], False))
        segments.append((trimmed, True))
        pos = start + len(trimmed)
    segments.append((full[pos:], False))
    return [(t, trained) for t, trained in segments if t]


def encode(
    tokenizer: Any, messages: list[Message], where: str, special_ids: set[int], open_end: bool = False
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Token ids and trained-token mask of one conversation; the bool says whether an eos token had to be appended.

    `open_end`: the last reply was cut by a length limit, so it ends at its last own token — the end of turn the
    template would add (and anything after it) is left out, since the model never wrote it."""
    ids: list[int] = []
    mask: list[bool] = []
    appended = False
    for text, trained in _segments(tokenizer, messages, where):
        seg = tokenizer(text, add_special_tokens=False)["input_ids"]
        if trained and not open_end and seg and seg[-1] not in special_ids and tokenizer.eos_token_id is not None:
            seg = [*seg, tokenizer.eos_token_id]
            appended = True
        ids += seg
        mask += [trained] * len(seg)
    if open_end:
        own = [i for i, (tid, m) in enumerate(zip(ids, mask)) if m and tid not in special_ids]
        end = own[-1] + 1 if own else 0
        ids, mask = ids[:end], mask[:end]
    return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool), appended


def special_token_ids(tokenizer: Any) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    for tid, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(tok, "special", False):
            ids.add(int(tid))
    return ids


def encode_all(
    tokenizer: Any,
    conversations: list[tuple[list[Message], str]],
    max_length: int,
    truncation: str,
    progress: Any = None,
    open_end: bool = False,
) -> tuple[list[Example], EncodeStats]:
    """Encode (messages, where) pairs, applying the length policy; returns the kept examples and counts.
    `open_end`: every last reply was cut by a length limit (see `encode`)."""
    stats = EncodeStats(rows=len(conversations))
    special = special_token_ids(tokenizer)
    out: list[Example] = []
    for messages, where in conversations:
        ids, mask, appended = encode(tokenizer, messages, where, special, open_end)
        stats.eos_appended += appended
        if len(ids) > max_length:
            if truncation == "error":
                raise DataError(
                    f"{where}: {len(ids)} tokens, longer than data.max_length = {max_length}. Raise data.max_length, "
                    'or set data.truncation = "drop" or "truncate".'
                )
            if truncation == "drop":
                stats.dropped_too_long += 1
                if progress:
                    progress()
                continue
            ids, mask = ids[:max_length], mask[:max_length]
            stats.truncated += 1
        if not mask[1:].any():  # the first token is never a target (nothing precedes it)
            stats.dropped_too_long += 1  # only truncation can empty a response that to_messages accepted
            if progress:
                progress()
            continue
        mask[0] = False
        out.append(Example(ids, mask, where))
        stats.kept += 1
        stats.trained_tokens += int(mask.sum())
        stats.total_tokens += len(ids)
        stats.max_len = max(stats.max_len, len(ids))
        if progress:
            progress()
    return out, stats
