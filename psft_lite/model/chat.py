"""Turns and their ends: which token closes an assistant turn, and every id generation must stop on.

One definition for training's masks, generation, the merge's generation config, and the GGUF/Ollama export: a chat
template that closes turns with `<|im_end|>`, `<|eot_id|>` or `<end_of_turn>` stops on that token everywhere.
"""

from __future__ import annotations

from typing import Any

#: Used when a run's own conversations cannot be read (no run directory, or its data moved since training).
FALLBACK_PROMPTS = [
    "What is the capital of France?",
    "Tom has 12 apples and buys 7 more. How many apples does he have?",
    "Write one sentence about the sea.",
    "List three prime numbers.",
]


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token the chat template closes an assistant turn with (what generation must stop on)."""
    marker = "\u2063psft\u2063"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception:
        return tokenizer.eos_token_id
    after = text[text.index(marker) + len(marker) :] if marker in text else ""
    specials = sorted(
        (t for t in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()) if t), key=len, reverse=True
    )
    stripped = after.lstrip()
    for tok in specials:
        if stripped.startswith(tok):
            return tokenizer.convert_tokens_to_ids(tok)
    return tokenizer.eos_token_id


def stop_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """Every token id that ends a turn: the template's end-of-turn token, the tokenizer's eos, and the ids a model's
    generation config already stops on."""
    ids = {end_of_turn_id(tokenizer), tokenizer.eos_token_id}
    gen_eos = getattr(generation_config, "eos_token_id", None)
    if gen_eos is not None:
        ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def stop_tokens(tokenizer: Any) -> list[str]:
    """The end-of-turn and eos tokens as text (Ollama's `stop` parameters), end-of-turn first."""
    ids = [end_of_turn_id(tokenizer), tokenizer.eos_token_id]
    return list(dict.fromkeys(tokenizer.convert_ids_to_tokens(i) for i in ids if i is not None))
