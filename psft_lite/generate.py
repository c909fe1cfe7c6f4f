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

from psft_lite import modeling
from psft_lite.data.formats import Message
from psft_lite.recipe import ModelSection, Recipe


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    label: str
    device: torch.device
    dtype: torch.dtype
    recipe: Recipe | None = None  # the run's recipe, when loaded from a run directory
    adapter: Path | None = None

    @property
    def has_adapter(self) -> bool:
        return self.adapter is not None


def is_adapter_source(path: Path) -> bool:
    from psft_lite.checkpoint import list_checkpoints

    return (
        (path / "adapter_config.json").is_file()
        or (path / "adapter" / "adapter_config.json").is_file()
        or bool(list_checkpoints(path))
    )


def load_model(spec: str | Path, dtype: str | None = None, device: str = "auto") -> Loaded:
    """Load `spec` for inference (eval mode, no gradients needed)."""
    from psft_lite.merge import resolve_adapter, with_adapter

    modeling.quiet_transformers()
    path = Path(spec)
    if path.is_dir() and is_adapter_source(path):
        from transformers import AutoTokenizer

        info = resolve_adapter(path)
        dev = modeling.resolve_device(device if device != "auto" else info.base.device)
        dt = modeling.DTYPES[dtype] if dtype else info.train_dtype(dev)
        model = with_adapter(modeling.load_base_model(info.base, dev, dt), info)
        tok_dir = info.path if (info.path / "tokenizer_config.json").is_file() else None
        tokenizer = AutoTokenizer.from_pretrained(tok_dir) if tok_dir else modeling.load_tokenizer(info.base)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        recipe = None
        if info.run_dir is not None:
            from psft_lite.recipe import load_recipe

            recipe = load_recipe(info.run_dir / "recipe.toml")
        loaded = Loaded(model, tokenizer, str(path), dev, dt, recipe, info.path)
    else:
        m = ModelSection(name=str(spec), dtype=dtype or "auto", device=device)
        dev = modeling.resolve_device(m.device)
        dt = modeling.resolve_dtype(m.dtype, dev)
        src = modeling.resolve_source(m)
        tokenizer = modeling.load_tokenizer(m, src)
        model = modeling.load_base_model(m, dev, dt, src)
        loaded = Loaded(model, tokenizer, str(spec), dev, dt)
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
        logp = torch.log_softmax(scores.float(), dim=-1)
        self.steps.append(-(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1).cpu())
        return scores


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
    from transformers import LogitsProcessorList

    tok, model = loaded.tokenizer, loaded.model
    ends = eos_ids(loaded)
    out: list[Generation] = []
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            texts = [render_prompt(tok, m) for m in chunk]
            enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(loaded.device)
            recorder = EntropyRecorder()
            torch.manual_seed(seed + start)
            sampling = temperature > 0
            kwargs: dict[str, Any] = {
                "do_sample": sampling,
                "max_new_tokens": max_new_tokens,
                "eos_token_id": ends,
                "pad_token_id": tok.pad_token_id,
                "logits_processor": LogitsProcessorList([recorder]),
            }
            if sampling:
                kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            with modeling.autocast(loaded.device, loaded.dtype):
                seqs = model.generate(**enc, **kwargs)
            new = seqs[:, enc["input_ids"].shape[1] :].cpu()
            ent = torch.stack(recorder.steps, 1) if recorder.steps else torch.zeros(len(chunk), 0)
            for row in range(len(chunk)):
                ids = new[row].tolist()
                n, finished = len(ids), False
                for i, t in enumerate(ids):
                    if t in ends:
                        n, finished = i + 1, True
                        break
                text = tok.decode(ids[: n - 1 if finished else n], skip_special_tokens=True)
                out.append(Generation(text, n, finished, float(ent[row, :n].mean()) if n else 0.0))
            if progress:
                progress(len(chunk))
    finally:
        tok.padding_side = old_side
    return out


def eos_ids(loaded: Loaded) -> list[int]:
    """Every token id that ends a turn: the tokenizer's eos and the generation config's."""
    ids = {loaded.tokenizer.eos_token_id}
    gen = getattr(loaded.model, "generation_config", None)
    if gen is not None and gen.eos_token_id is not None:
        ids |= set(gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id])
    return sorted(i for i in ids if i is not None)


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
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    with modeling.autocast(loaded.device, loaded.dtype):
        out = loaded.model.generate(**enc, **kwargs)
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def read_prompts(path: Path) -> list[list[Message]]:
    """Prompts from a .jsonl file: rows with `messages` (a trailing assistant turn is dropped) or `prompt`."""
    import json

    from psft_lite.errors import DataError

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
