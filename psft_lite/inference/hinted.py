"""`psft-lite hint`: Hinted Decoding (docs/METHODS.md §5) — rewrite a training set into the model's own distribution.

For each (problem, reference solution):
1. Hint prefix: the model (greedy) analyses the reference under `# Analyze`, then starts its own reasoning under
   `# CoT`; the text up to and including the `# CoT` heading is kept (no heading: the example is dropped). Greedy
   generation stops at the first heading line — what a model writes after it would be cut anyway, and small models
   otherwise loop `# CoT` blocks until the token limit, which then primes the hinted stream to loop too.
2. Two streams of the same model decoded together — one batch of 2, each with its own KV cache:
   hinted p = analysis prompt + hint prefix; plain q = the plain chat prompt (what the fine-tuned model will see).
3. First token from p alone; then λ = clamp(β·H(p)/ln|V|, 0, 1) and logits (1−λ)·log p + λ·log q, nucleus top-p,
   then temperature; the token is appended to both streams. Confident p dictates content; uncertain p lets q word it.
4. After the answer marker appears, q alone. Stop on end-of-turn, max length, or a repeating 30-token window.
5. Score with DDT (mean φ under the plain context); keep finished rewrites (end-of-turn, not cut by the length or
   repetition stop: training appends end-of-turn to every target) with the right answer and φ ≥ `--min-phi`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from psft_lite.data.tokenize import Example
from psft_lite.inference.generate import Loaded, eos_ids, render_prompt
from psft_lite.model import scoring
from psft_lite.tracking.metrics import read_metrics, read_records

ANALYSIS_SYSTEM = (
    "You are given a problem and a reference solution. First write the heading '# Analyze' and explain the reference "
    "solution line by line: what each step computes and why. Then write the heading '# CoT' and begin your own "
    "step-by-step solution of the problem in your own words, without mentioning that a reference solution was given."
)
ANALYZE = "# Analyze\n"
COT = "# CoT"
# A `CoT` heading on its own line at any markdown level: small models write `#### CoT` as often as `# CoT`.
COT_HEADING = re.compile(r"^#{1,6}[ \t]*CoT[ \t]*:?[ \t]*(?=\n|\Z)", re.MULTILINE | re.IGNORECASE)


@dataclass
class HintConfig:
    beta: float = 3.0
    temperature: float = 0.3
    top_p: float = 0.95
    max_new_tokens: int = 8192
    hint_max_tokens: int = 512
    answer_marker: str = "####"
    repeat_window: int = 30
    repeat_count: int = 5
    seed: int = 0
    cot_fallback: bool = False  # small models rarely write `# CoT`: append the heading instead of dropping


@dataclass
class Decoded:
    tokens: list[int]
    text: str
    finish: str  # eos | length | repetition
    lambdas: list[float] = field(default_factory=list)
    handoff: int | None = None  # token index where the answer marker appeared

    @property
    def mean_lambda(self) -> float:
        return float(np.mean(self.lambdas)) if self.lambdas else 0.0


def analysis_messages(question_msgs: list[dict[str, str]], reference: str) -> list[dict[str, str]]:
    question = question_msgs[-1]["content"]
    return [
        {"role": "system", "content": ANALYSIS_SYSTEM},
        {"role": "user", "content": f"Problem:\n{question}\n\nReference solution:\n{reference}"},
    ]


class StopAtCoT:
    """Stopping criterion: the generated text has a complete `CoT` heading line."""

    def __init__(self, tokenizer: Any, start: int):
        self.tokenizer, self.start = tokenizer, start

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.tensor(
            [self.complete(self.tokenizer.decode(row[self.start :], skip_special_tokens=True)) for row in input_ids],
            device=input_ids.device,
        )

    @staticmethod
    def complete(text: str) -> bool:
        return any(m.end() < len(text) for m in COT_HEADING.finditer(text))  # the heading's line has ended


def cut_at_cot(text: str, fallback: bool = False) -> str | None:
    """The analysis up to the last `CoT` heading, which is written as `# CoT` (None: no heading and no fallback)."""
    heads = list(COT_HEADING.finditer(text))
    if not heads:
        return text.rstrip() + f"\n\n{COT}\n" if fallback else None
    return text[: heads[-1].start()] + COT + "\n"


@torch.no_grad()
def hint_prefix(
    loaded: Loaded, question_msgs: list[dict[str, str]], reference: str, cfg: HintConfig
) -> tuple[str, str | None]:
    """(the greedy analysis as written, the hint prefix cut at its `CoT` heading or None when it has none)."""
    from transformers import StoppingCriteriaList

    tok = loaded.tokenizer
    prompt = render_prompt(tok, analysis_messages(question_msgs, reference)) + ANALYZE
    enc = tok(prompt, add_special_tokens=False, return_tensors="pt").to(loaded.device)
    start = enc["input_ids"].shape[1]
    with scoring.autocast(loaded.device, loaded.dtype):
        out = loaded.model.generate(
            **enc,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            max_new_tokens=cfg.hint_max_tokens,
            eos_token_id=eos_ids(loaded),
            pad_token_id=tok.pad_token_id,
            stopping_criteria=StoppingCriteriaList([StopAtCoT(tok, start)]),
        )
    analysis = ANALYZE + tok.decode(out[0, start:], skip_special_tokens=True)
    return analysis, cut_at_cot(analysis, cfg.cot_fallback)


def mix_step(
    lp: torch.Tensor, lq: torch.Tensor, beta: float, first: bool, handed_off: bool
) -> tuple[torch.Tensor, float]:
    """Mixed log-scores for one step and λ (docs/METHODS.md §5.3). lp, lq: [V] log-probabilities (float32)."""
    if first:
        return lp, 0.0
    if handed_off:
        return lq, 1.0
    h = -(lp.exp() * lp).sum()
    lam = float((beta * h / math.log(lp.shape[-1])).clamp(0.0, 1.0))
    return (1 - lam) * lp + lam * lq, lam


def nucleus(scores: torch.Tensor, top_p: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, probabilities) to draw from: the top-p nucleus of softmax(scores), then sharpened by temperature."""
    probs = torch.softmax(scores.float(), -1)
    sorted_p, order = probs.sort(descending=True)
    keep = (sorted_p.cumsum(-1) - sorted_p) < top_p  # every token needed to reach top_p (at least the first)
    kept = order[keep]
    return kept, torch.softmax(torch.log(probs[kept].clamp_min(1e-30)) / temperature, -1)


def sample(scores: torch.Tensor, top_p: float, temperature: float, gen: torch.Generator) -> int:
    """One draw from `nucleus` (greedy at temperature 0)."""
    if temperature <= 0:
        return int(scores.argmax())
    kept, probs = nucleus(scores, top_p, temperature)
    return int(kept[torch.multinomial(probs, 1, generator=gen)])


def repeating(tokens: list[int], window: int, count: int) -> bool:
    """The last `window` tokens occur `count` or more times in the generated text."""
    if len(tokens) < window * count:
        return False
    tail = tokens[-window:]
    arr = np.asarray(tokens)
    hits = 0
    for start in np.flatnonzero(arr[: len(arr) - window + 1] == tail[0]):
        if tokens[start : start + window] == tail:
            hits += 1
            if hits >= count:
                return True
    return False


class _Streams:
    """Two prompts decoded in one batch, left-padded, each with its own KV cache rows."""

    def __init__(self, loaded: Loaded, prompts: list[list[int]], incremental: bool):
        self.loaded, self.incremental = loaded, incremental
        self.cache_name = scoring.cache_kwarg(loaded.model)
        width = max(len(p) for p in prompts)
        pad = loaded.tokenizer.pad_token_id
        self.ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=loaded.device)
        self.mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=loaded.device)
        self.past = None

    def logits(self) -> torch.Tensor:
        """Next-token log-probabilities [2, V] (float32)."""
        pos = (self.mask.cumsum(-1) - 1).clamp(min=0)
        if self.incremental and self.past is not None:
            ids, pos = self.ids[:, -1:], pos[:, -1:]
        else:
            ids = self.ids
        past = {self.cache_name: self.past} if self.incremental else {}
        with scoring.autocast(self.loaded.device, self.loaded.dtype):
            out = self.loaded.model(
                input_ids=ids, attention_mask=self.mask, position_ids=pos, use_cache=self.incremental, **past
            )
        if self.incremental:
            self.past = scoring.output_cache(out)
        return torch.log_softmax(out.logits[:, -1].float(), -1)

    def append(self, token: int) -> None:
        col = torch.full((2, 1), token, device=self.ids.device)
        self.ids = torch.cat([self.ids, col], 1)
        self.mask = torch.cat([self.mask, torch.ones_like(col)], 1)


@torch.no_grad()
def decode(
    loaded: Loaded,
    hinted: list[int],
    plain: list[int],
    cfg: HintConfig,
    seed: int,
    incremental: bool = True,
    progress: Callable[[], None] | None = None,
) -> Decoded:
    """Hinted Decoding of one example from the two prompts' token ids."""
    tok = loaded.tokenizer
    eos = set(eos_ids(loaded))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    streams = _Streams(loaded, [hinted, plain], incremental)
    tokens: list[int] = []
    lambdas: list[float] = []
    handoff = None
    finish = "length"
    for i in range(cfg.max_new_tokens):
        lp, lq = streams.logits().cpu()
        scores, lam = mix_step(lp, lq, cfg.beta, first=i == 0, handed_off=handoff is not None)
        if i > 0:
            lambdas.append(lam)
        t = sample(scores, cfg.top_p, cfg.temperature, gen)
        if progress:
            progress()
        if t in eos:
            finish = "eos"
            break
        tokens.append(t)
        streams.append(t)
        if handoff is None and cfg.answer_marker and cfg.answer_marker in tok.decode(tokens[-16:]):
            handoff = len(tokens)
        if len(tokens) % 10 == 0 and repeating(tokens, cfg.repeat_window, cfg.repeat_count):
            finish = "repetition"
            break
    return Decoded(tokens, tok.decode(tokens, skip_special_tokens=True), finish, lambdas, handoff)


def prompt_ids(loaded: Loaded, messages: list[dict[str, str]], prefix: str = "") -> list[int]:
    text = render_prompt(loaded.tokenizer, messages) + prefix
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"]


def mean_phi(loaded: Loaded, prompt: list[int], response: list[int]) -> float:
    """Mean φ of `response` tokens after `prompt` under the model (the DDT score, plain context)."""
    from psft_lite.inference.ddt import token_phi

    ids = np.asarray(prompt + response, dtype=np.int32)
    mask = np.zeros(len(ids), dtype=bool)
    mask[len(prompt) :] = True
    (phi,) = token_phi(
        loaded.model, [Example(ids, mask, "hint")], loaded.tokenizer.pad_token_id, loaded.device, loaded.dtype
    )
    return float(phi.mean()) if phi.numel() else 0.0


def stable_id(data: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(data, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:16]


def read_done(path: Path) -> set[str]:
    """ids already written to an output (kept or dropped); a torn last line is repaired, a file we did not write is
    an error, never truncated (metrics.read_records)."""
    return {rec["hint_id"] for rec in read_records(path, "hint_id", "psft-lite hint")}


def rewrite_one(loaded: Loaded, row: Any, hid: str, fmt: str, fields: Any, data: Any, cfg: HintConfig) -> Rewrite:
    """Hinted Decoding of one example: the hint prefix, the two-stream decode, and its scores (φ, answer)."""
    from psft_lite.data.formats import to_messages, with_response
    from psft_lite.inference.evaluate import answers_match, extract_answer, gold_answer

    *prompt_msgs, last = to_messages(row, fmt, fields, data.system_prompt)
    reference = last["content"]
    gold = gold_answer(row.data, reference)
    plain = prompt_ids(loaded, prompt_msgs)
    ref_ids = loaded.tokenizer(reference, add_special_tokens=False)["input_ids"] + [loaded.tokenizer.eos_token_id]
    record: dict[str, Any] = {
        "hint_id": hid,
        "hint_where": row.where,
        "hint_reference_answer": gold,
        "hint_reference_phi": mean_phi(loaded, plain, ref_ids),
    }
    analysis, prefix = hint_prefix(loaded, prompt_msgs, reference, cfg)
    if prefix is None:
        return Rewrite({**record, "hint_analysis": analysis}, None)  # keep what the model wrote instead
    hinted = prompt_ids(loaded, analysis_messages(prompt_msgs, reference), prefix)
    d = decode(loaded, hinted, plain, cfg, seed=cfg.seed * 1_000_003 + int(hid[:8], 16))
    answer = extract_answer(d.text)
    resp = d.tokens + ([loaded.tokenizer.eos_token_id] if d.finish == "eos" else [])
    record.update(
        hint_answer=answer,
        hint_correct=answers_match(answer, gold),
        hint_finish=d.finish,
        hint_tokens=len(d.tokens),
        hint_phi=mean_phi(loaded, plain, resp),
        hint_lambda_mean=d.mean_lambda,
        hint_prefix=prefix,
    )
    return Rewrite({**with_response(row.data, fmt, fields, d.text), **record}, d)


@dataclass
class Rewrite:
    record: dict[str, Any]  # the output row: the example with its new response, plus hint_* fields
    decoded: Decoded | None  # None: the analysis had no `# CoT` heading, nothing was decoded


def drop_reason(r: Rewrite, keep: str, min_phi: float | None) -> str | None:
    """Why a rewrite is dropped (None: kept). With keep="correct" it must have finished with the right answer."""
    if r.decoded is None:
        return "no_cot"
    if keep == "correct" and r.decoded.finish != "eos":
        return "unfinished"  # cut by the length or repetition stop: not a whole solution
    if keep == "correct" and not r.record["hint_correct"]:
        return "wrong_answer"
    if min_phi is not None and r.record["hint_phi"] < min_phi:
        return "low_phi"
    return None


def _progress(console: Any, total: int, completed: int) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("[bold]hint[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=console is None,
    )
    bar.add_task("", total=total, completed=completed, rate="")
    return bar


def run(
    loaded: Loaded,
    rows: list[Any],
    data: Any,
    out: Path,
    cfg: HintConfig,
    keep: str = "correct",
    min_phi: float | None = None,
    console: Any = None,
) -> dict[str, Any]:
    """Rewrite every row (`data.sources.read_rows`, read and checked by the caller before the model loaded) into
    `out` (kept) and `out.dropped.jsonl`; resumable; returns the summary over every row written so far (this call's
    and earlier calls')."""
    from psft_lite.data import resolve_format

    fmt, fields = resolve_format(rows, data)
    dropped_path = out.with_name(out.stem + ".dropped.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(out) | read_done(dropped_path)
    ids = [stable_id(row.data) for row in rows]
    todo = [(row, hid) for row, hid in zip(rows, ids) if hid not in done]
    tokens_total, t0 = 0, time.perf_counter()
    with (
        open(out, "a", encoding="utf-8") as kept_f,
        open(dropped_path, "a", encoding="utf-8") as drop_f,
        _progress(console, len(rows), len(rows) - len(todo)) as progress,
    ):
        for n_new, (row, hid) in enumerate(todo, 1):
            r = rewrite_one(loaded, row, hid, fmt, fields, data, cfg)
            tokens_total += len(r.decoded.tokens) if r.decoded else 0
            reason = drop_reason(r, keep, min_phi)
            f = kept_f if reason is None else drop_f
            f.write(json.dumps({**r.record, **({"hint_dropped": reason} if reason else {})}, ensure_ascii=False) + "\n")
            f.flush()
            dt = time.perf_counter() - t0
            progress.update(0, advance=1, rate=f"{n_new / dt:.2f} ex/s  {tokens_total / dt:.1f} tok/s")
    return {
        **summarize(out, dropped_path, set(ids)),
        "examples": len(rows),
        "skipped_done": len(rows) - len(todo),
        "generated_tokens": tokens_total,
    }


def summary_lines(s: dict[str, Any]) -> list[str]:
    """What `psft-lite hint` prints at the end."""
    lines = [
        f"hint: {s['kept']} of {s['examples']} kept; dropped {s['no_cot']} without # CoT, {s['unfinished']} "
        f"unfinished (length/repetition), {s['wrong_answer']} wrong answer, {s['low_phi']} below --min-phi "
        f"({s['skipped_done']} were done before this run)"
    ]
    if s["decoded"]:
        acc = s["correct"] / s["decoded"]
        lines.append(
            f"  answer accuracy of the rewrites {acc:.0%} ({s['correct']}/{s['decoded']}); mean φ reference "
            f"{s['mean_phi_reference']:+.3f} → rewrites {s['mean_phi_hinted']:+.3f}"
        )
    if s["kept"]:
        lines.append(
            f"  kept rewrites: mean φ {s['mean_phi_kept']:+.3f} (their references {s['mean_phi_reference_kept']:+.3f})"
        )
    lines.append(f'  wrote {s["out"]} (train on it directly: data.train = "{s["out"]}") and {s["dropped_file"]}')
    return lines


def summarize(out: Path, dropped_path: Path, ids: set[str]) -> dict[str, Any]:
    """Counts and mean φ over the records of `ids` in the kept and dropped files (so a resumed run reports all)."""
    kept = [
        rec for rec in read_metrics(out) if rec["hint_id"] in ids
    ]  # both files exist: `run` opened them for appending
    dropped = [rec for rec in read_metrics(dropped_path) if rec["hint_id"] in ids]
    decoded = [rec for rec in kept + dropped if "hint_phi" in rec]
    mean = lambda rs, key: float(np.mean([rec[key] for rec in rs])) if rs else None  # noqa: E731
    reasons = {
        k: sum(rec["hint_dropped"] == k for rec in dropped) for k in ("no_cot", "unfinished", "wrong_answer", "low_phi")
    }
    return {
        "kept": len(kept),
        **reasons,
        "decoded": len(decoded),
        "correct": sum(bool(rec["hint_correct"]) for rec in decoded),
        "mean_phi_reference": mean(decoded, "hint_reference_phi"),
        "mean_phi_hinted": mean(decoded, "hint_phi"),
        "mean_phi_reference_kept": mean(kept, "hint_reference_phi"),
        "mean_phi_kept": mean(kept, "hint_phi"),
        "out": str(out),
        "dropped_file": str(dropped_path),
    }
