"""The Ollama Modelfile for an exported GGUF: a TEMPLATE and stop tokens that reproduce the chat template the run
trained with. A Modelfile without them is the classic cause of endless or garbled answers in Ollama.

The template is not guessed from the model's name: the run's own (Jinja) chat template is rendered on marker
conversations to read off the text around each role's content, the Go template is assembled from those pieces, and
the pieces are checked by re-rendering several conversations and comparing with the Jinja output, character for
character. A chat template that does not decompose this way gets no Modelfile (and the export says so).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_M = "\u2063{}\u2063"  # invisible separators: never produced by a template itself


@dataclass(frozen=True)
class ChatFormat:
    """A role-generic chat format: each turn is prefix + content + suffix; generation starts after `gen_prompt`."""

    system: tuple[str, str]
    user: tuple[str, str]
    assistant: tuple[str, str]
    gen_prompt: str
    lead: str  # text before the first turn (e.g. a BOS the template writes)
    default_system: str | None  # the system prompt the template adds when the conversation has none

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        parts = [self.lead]
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            parts.append(self.system[0] + self.default_system + self.system[1])
        for m in messages:
            pre, suf = getattr(self, m["role"])
            parts.append(pre + m["content"] + suf)
        if add_generation_prompt:
            parts.append(self.gen_prompt)
        return "".join(parts)


def _render(tokenizer: Any, msgs: list[tuple[str, str]], gen: bool) -> str:
    return tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in msgs], tokenize=False, add_generation_prompt=gen
    )


def _between(text: str, *marks: str) -> list[str]:
    """The text before, between and after the markers, which must appear in order."""
    out, pos = [], 0
    for m in marks:
        i = text.index(m, pos)
        out.append(text[pos:i])
        pos = i + len(m)
    out.append(text[pos:])
    return out


def chat_format(tokenizer: Any) -> ChatFormat | None:
    """Read the chat format off the tokenizer's template; None when it is not role-generic prefix/suffix text."""
    s, u1, a1, u2 = (_M.format(x) for x in ("S", "U1", "A1", "U2"))
    try:
        p0, p1, p2, p3, p4 = _between(
            _render(tokenizer, [("system", s), ("user", u1), ("assistant", a1), ("user", u2)], True), s, u1, a1, u2
        )
        *_, asst_suf = _between(_render(tokenizer, [("system", s), ("user", u1), ("assistant", a1)], False), s, u1, a1)
        *_, user_suf = _between(_render(tokenizer, [("system", s), ("user", u1)], False), s, u1)
        lead_default, _after = _between(_render(tokenizer, [("user", u1)], True), u1)
    except Exception:  # markers missing (template drops a role) or the template raises
        return None
    if not (p3.startswith(asst_suf) and p2.startswith(user_suf) and p4.startswith(user_suf)):
        return None
    user_pre = p3[len(asst_suf) :]
    if not p1.endswith(user_pre):
        return None
    sys_suf = p1[: len(p1) - len(user_pre)]
    asst_pre = p2[len(user_suf) :]
    gen_prompt = p4[len(user_suf) :]
    bos = tokenizer.bos_token or ""
    lead = bos if bos and p0.startswith(bos) and not user_pre.startswith(bos) else ""  # a BOS, not turn markup
    sys_pre = p0[len(lead) :]
    # with no system message, the template either starts the user turn at once or writes a default system turn
    head = lead_default[len(lead) :] if lead_default.startswith(lead) else None
    default_system = None
    if head is None:
        return None
    if head != user_pre:
        if not (head.startswith(sys_pre) and head.endswith(sys_suf + user_pre)):
            return None
        default_system = head[len(sys_pre) : len(head) - len(sys_suf + user_pre)]
    if (user_pre, user_suf) == (asst_pre, asst_suf):
        return None  # the roles leave no mark: nothing for a TEMPLATE to reproduce
    fmt = ChatFormat((sys_pre, sys_suf), (user_pre, user_suf), (asst_pre, asst_suf), gen_prompt, lead, default_system)
    return fmt if _reproduces(fmt, tokenizer) else None


CHECK_CONVERSATIONS = [
    [("user", "What is 2 + 2?")],
    [("system", "Answer briefly."), ("user", "Name a colour.")],
    [("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "Tell me a joke.\nA short one.")],
    [("system", "You are terse."), ("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")],
]


def _reproduces(fmt: ChatFormat, tokenizer: Any) -> bool:
    for conv in CHECK_CONVERSATIONS:
        msgs = [{"role": r, "content": c} for r, c in conv]
        gen = conv[-1][0] == "user"
        if fmt.render(msgs, gen) != _render(tokenizer, conv, gen):
            return False
    return True


def _go(text: str) -> str:
    """Literal text inside a Go template (a `{{` would start an action) and inside a Modelfile triple-quote."""
    return text.replace("{{", '{{ "{{" }}').replace('"""', '\\"\\"\\"')


def go_template(fmt: ChatFormat) -> str:
    """The Ollama (Go text/template) rendering of `fmt`, on one logical line so no `{{-` trimming eats newlines.
    Ollama's runtime adds the BOS token itself, so a BOS the Jinja template writes is left out. Ollama joins every
    system message (and the Modelfile's SYSTEM when the request has none) into `.System` but also leaves them in
    `.Messages`, so system turns are written once, from `.System`, as Ollama's own templates do."""
    sp, ss = map(_go, fmt.system)
    up, us = map(_go, fmt.user)
    ap, as_ = map(_go, fmt.assistant)
    return (
        f"{{{{ if .System }}}}{sp}{{{{ .System }}}}{ss}{{{{ end }}}}"
        f'{{{{ range .Messages }}}}{{{{ if eq .Role "user" }}}}{up}{{{{ .Content }}}}{us}'
        f'{{{{ else if eq .Role "assistant" }}}}{ap}{{{{ .Content }}}}{as_}{{{{ end }}}}{{{{ end }}}}'
        f"{_go(fmt.gen_prompt)}"
    )


def modelfile(
    gguf_name: str,
    fmt: ChatFormat | None,
    stops: list[str],
    num_ctx: int,
    adapter_name: str | None = None,
) -> str:
    """An Ollama Modelfile: FROM the GGUF (and ADAPTER), TEMPLATE, SYSTEM, stop tokens and sampling defaults."""
    lines = [
        "# Ollama Modelfile written by psft-lite export. Use: ollama create NAME -f Modelfile",
        f"FROM ./{gguf_name}",
    ]
    if adapter_name:
        lines.append(f"ADAPTER ./{adapter_name}")
    if fmt is not None:
        lines.append(f'TEMPLATE """{go_template(fmt)}"""')
        if fmt.default_system is not None:
            lines.append(f'SYSTEM """{_go(fmt.default_system)}"""')
    for s in stops:
        lines.append(f'PARAMETER stop "{s}"')
    lines += [
        f"PARAMETER num_ctx {num_ctx}",
        "PARAMETER temperature 0.7",
        "PARAMETER top_p 0.9",
        "PARAMETER repeat_penalty 1.05",
    ]
    return "\n".join(lines) + "\n"
