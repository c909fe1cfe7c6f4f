"""Load any model a user can name for inference, and generate from chat prompts in batches.

`load_model` accepts a base model (hub id, folder, .gguf, the embedded alias), a run directory (its base loaded as
trained + its adapter; the newest checkpoint if the run has no final adapter), an adapter or checkpoint folder, or a
merged folder. The tokenizer — and so the chat template — is the one the run trained with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from psft_lite.core import rundir
from psft_lite.data.formats import Message
from psft_lite.model import loading, runtime, scoring
from psft_lite.model.adapters import is_adapter_source, resolve_adapter, with_adapter
from psft_lite.model.chat import stop_ids
from psft_lite.recipe.schema import ModelSection, Recipe


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    label: str
    device: torch.device
    dtype: torch.dtype
    recipe: Recipe | None = None  # the run's recipe, when loaded from a run directory
    adapter: Path | None = None
    base_spec: dict[str, Any] | None = None  # how the base was loaded (its model section): what caches are keyed on

    @property
    def has_adapter(self) -> bool:
        return self.adapter is not None


def load_model(spec: str | Path, dtype: str | None = None, device: str = "auto") -> Loaded:
    """Load `spec` for inference (eval mode, no gradients needed)."""
    runtime.quiet_transformers()
    path = Path(spec)
    if path.is_dir() and is_adapter_source(path):
        from transformers import AutoTokenizer

        info = resolve_adapter(path)
        dev = runtime.resolve_device(device if device != "auto" else info.base.device)
        dt = runtime.DTYPES[dtype] if dtype else info.train_dtype(dev)
        model = with_adapter(loading.load_base_model(info.base, dev, dt), info)
        tok_dir = info.path if (info.path / "tokenizer_config.json").is_file() else None
        tokenizer = AutoTokenizer.from_pretrained(tok_dir) if tok_dir else loading.load_tokenizer(info.base)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        recipe = None
        if info.run_dir is not None:
            from psft_lite.recipe.schema import load_recipe

            recipe = load_recipe(rundir.recipe_file(info.run_dir))
        base_spec = info.base.model_dump(mode="json", exclude_none=True)
        loaded = Loaded(model, tokenizer, str(path), dev, dt, recipe, info.path, base_spec)
    else:
        m = ModelSection(name=str(spec), dtype=dtype or "auto", device=device)
        dev = runtime.resolve_device(m.device)
        dt = runtime.resolve_dtype(m.dtype, dev)
        src = loading.resolve_source(m)
        tokenizer = loading.load_tokenizer(m, src)
        model = loading.load_base_model(m, dev, dt, src)
        loaded = Loaded(model, tokenizer, str(spec), dev, dt, base_spec=m.model_dump(mode="json", exclude_none=True))
    loaded.model.eval()
    loaded.model.config.use_cache = True
    return loaded


class EntropyRecorder:
    """A logits processor that records the model's own entropy (temperature 1) at every generated token.

    Custom processors run before transformers' temperature/top-p warpers, so these are the model's raw distributions.
    """

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []  # per step: [B] entropy

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.steps.append(entropy(torch.log_softmax(scores.float(), dim=-1)).cpu())
        return scores


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of log-probabilities (a −inf entry, a masked token, contributes 0)."""
    return -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)


@dataclass
class Generation:
    text: str
    n_tokens: int
    finished: bool  # ended with an end-of-turn token rather than the length limit
    mean_entropy: float


def render_prompt(tokenizer: Any, messages: list[Message]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate(
    loaded: Loaded,
    prompts: list[list[Message]],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[Generation]:
    """Complete each chat prompt; greedy when temperature is 0. Batched with left padding."""
    tok = loaded.tokenizer
    out: list[Generation] = []
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            torch.manual_seed(seed + start)
            out += _generate_batch(loaded, chunk, max_new_tokens, temperature, top_p)
            if progress:
                progress(len(chunk))
    finally:
        tok.padding_side = old_side
    return out


def sampling_kwargs(temperature: float, top_p: float) -> dict[str, Any]:
    """transformers' generate settings: nucleus sampling at `temperature`, or greedy (the model's own generation
    config's sampling defaults switched off) when it is 0."""
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def _generate_batch(
    loaded: Loaded, chunk: list[list[Message]], max_new_tokens: int, temperature: float, top_p: float
) -> list[Generation]:
    tok, ends = loaded.tokenizer, eos_ids(loaded)
    texts = [render_prompt(tok, m) for m in chunk]
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(loaded.device)
    with scoring.autocast(loaded.device, loaded.dtype):
        if temperature == 0 and plain_greedy(loaded.model):
            rows = greedy(loaded.model, enc["input_ids"], enc["attention_mask"], max_new_tokens, ends)
        else:
            rows = _hf_generate(loaded, enc, max_new_tokens, temperature, top_p, ends)
    out = []
    for ids, ent in rows:
        end = next((i for i, t in enumerate(ids) if t in ends), None)
        n, finished = (end + 1, True) if end is not None else (len(ids), False)
        text = tok.decode(ids[: n - 1 if finished else n], skip_special_tokens=True)
        out.append(Generation(text, n, finished, float(sum(ent[:n]) / n) if n else 0.0))
    return out


def _hf_generate(
    loaded: Loaded, enc: Any, max_new_tokens: int, temperature: float, top_p: float, ends: list[int]
) -> list[tuple[list[int], list[float]]]:
    """transformers' generate (sampling, or greedy under the model's own logits settings): (tokens, entropies)."""
    from transformers import LogitsProcessorList

    recorder = EntropyRecorder()
    seqs = loaded.model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        eos_token_id=ends,
        pad_token_id=loaded.tokenizer.pad_token_id,
        logits_processor=LogitsProcessorList([recorder]),
        **sampling_kwargs(temperature, top_p),
    )
    new = seqs[:, enc["input_ids"].shape[1] :].cpu()
    ent = torch.stack(recorder.steps, 1) if recorder.steps else torch.zeros(len(new), 0)
    return [(new[row].tolist(), ent[row].tolist()) for row in range(len(new))]


#: generation settings that change greedy decoding's scores, with their neutral values
_LOGITS_SETTINGS = {
    "repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_repetition_penalty": (None, 1.0),
    "min_new_tokens": (None, 0),
    "min_length": (None, 0),
    "bad_words_ids": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "sequence_bias": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
}


def plain_greedy(model: Any) -> bool:
    """Whether greedy decoding for this model is the argmax of its raw scores: no repetition penalty or other score
    setting in its generation config (a hub model's config may carry one, and transformers' generate applies it)."""
    gc = getattr(model, "generation_config", None)
    return gc is None or all(getattr(gc, k, None) in ok for k, ok in _LOGITS_SETTINGS.items())


@torch.no_grad()
def greedy(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, ends: list[int]
) -> list[tuple[list[int], list[float]]]:
    """Greedy decoding of a left-padded batch, (tokens, entropy per token) per row, that drops each row from the
    batch (and its KV cache) once it ends its turn — transformers' generate computes every row until the last one
    ends, which for evaluation answers of uneven length is a third of the work. The tokens are its greedy tokens."""
    n = input_ids.shape[0]
    tokens: list[list[int]] = [[] for _ in range(n)]
    entropies: list[list[float]] = [[] for _ in range(n)]
    active = torch.arange(n)
    mask = attention_mask
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    step_ids, cache = input_ids, None
    stop = torch.tensor(ends, device=input_ids.device)
    keep_last = {"logits_to_keep": 1} if scoring.forward_takes(model, "logits_to_keep") else {}
    cache_name = scoring.cache_kwarg(model)
    for _ in range(max_new_tokens):
        cached = {cache_name: cache} if cache is not None else {}
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=pos, use_cache=True, **keep_last, **cached)
        logp = torch.log_softmax(out.logits[:, -1].float(), -1)
        nxt = logp.argmax(-1)
        ent = entropy(logp)
        for row, t, e in zip(active.tolist(), nxt.tolist(), ent.tolist()):
            tokens[row].append(t)
            entropies[row].append(e)
        cache = scoring.output_cache(out)
        going = ~torch.isin(nxt, stop)
        if not bool(going.any()):
            break
        if not bool(going.all()):
            keep = going.nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            active, nxt, mask, pos = active[going.cpu()], nxt[keep], mask[keep], pos[keep]
        step_ids = nxt[:, None]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        pos = pos[:, -1:] + 1
    return list(zip(tokens, entropies))


def eos_ids(loaded: Loaded) -> list[int]:
    """Every token id that ends a turn for this model (model.chat.stop_ids)."""
    return stop_ids(loaded.tokenizer, getattr(loaded.model, "generation_config", None))


@torch.no_grad()
def chat_reply(
    loaded: Loaded,
    messages: list[Message],
    max_new_tokens: int = 512,
    temperature: float = 0.7,
    top_p: float = 0.95,
    stream: Any = None,
) -> str:
    """One assistant turn for an interactive chat, streamed token by token to `stream` (a transformers streamer)."""
    tok = loaded.tokenizer
    enc = tok(render_prompt(tok, messages), add_special_tokens=False, return_tensors="pt").to(loaded.device)
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "eos_token_id": eos_ids(loaded),
        "pad_token_id": tok.pad_token_id,
        "streamer": stream,
    }
    kwargs.update(sampling_kwargs(temperature, top_p))
    with scoring.autocast(loaded.device, loaded.dtype):
        out = loaded.model.generate(**enc, **kwargs)
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def chat_loop(
    loaded: Loaded, system: str | None, max_new_tokens: int, temperature: float, top_p: float, console: Any
) -> None:
    """`psft-lite chat`: read a line, stream the reply, until /exit or end of input; /reset forgets the history."""
    import sys

    from transformers import TextStreamer

    history = [{"role": "system", "content": system}] if system else []
    messages = list(history)
    streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            console.print("")
            return
        command = line.strip()
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            messages = list(history)
        if command in ("/reset", ""):
            continue
        messages.append({"role": "user", "content": line})
        sys.stdout.write("model> ")
        sys.stdout.flush()
        reply = chat_reply(loaded, messages, max_new_tokens, temperature, top_p, stream=streamer)
        messages.append({"role": "assistant", "content": reply})


def read_prompts(path: Path) -> list[list[Message]]:
    """Prompts from a .jsonl file: rows with `messages` (a trailing assistant turn is dropped) or `prompt`."""
    import json

    from psft_lite.core.errors import DataError

    if not path.is_file():
        raise DataError(f"{path}: prompts file not found.")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg}).") from None
        if isinstance(row, dict) and isinstance(row.get("messages"), list):
            msgs = [m for m in row["messages"] if isinstance(m, dict)]
            if msgs and msgs[-1].get("role") == "assistant":
                msgs = msgs[:-1]
            prompts.append(msgs)
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
            prompts.append([{"role": "user", "content": row["prompt"]}])
        else:
            raise DataError(f"{path}:{n}: expected an object with a `prompt` string or a `messages` list.")
    if not prompts:
        raise DataError(f"{path}: no prompts.")
    return prompts
