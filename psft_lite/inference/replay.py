"""Self-replay (recipe `[data.replay]`): the base model's own greedy answers to general prompts, generated once per
model, prompt file and settings, cached under $PSFT_LITE_HOME/replay/, and trained as ordinary examples at a share of
every epoch. Training on them pulls a fine-tune back towards what the model already did, without outside data.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from psft_lite.core.errors import RecipeError
from psft_lite.core.files import atomic_write_text

DEFAULT_POOL = Path(__file__).resolve().parent.parent / "data" / "replay" / "prompts.jsonl"


def prompt_file(replay: Any, base_dir: Path | None = None) -> Path:
    """The prompt file `data.replay.prompts` names (relative to the working directory, then to the recipe), or the
    shipped pool."""
    if replay.prompts is None:
        return DEFAULT_POOL
    path = Path(replay.prompts)
    if not path.is_absolute() and not path.exists() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    return path


def read_prompts(replay: Any, base_dir: Path | None = None) -> list[str]:
    """The replay prompts; a missing, unreadable or empty file is a RecipeError naming `data.replay.prompts`."""
    path = prompt_file(replay, base_dir)
    if not path.is_file():
        raise RecipeError(
            f"data.replay.prompts: {path} not found. Give a .jsonl file with a `prompt` string per row, or leave the "
            "key out to use the shipped pool of general prompts."
        )
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecipeError(f"data.replay.prompts: {path}:{n} is not valid JSON ({e.msg}).") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise RecipeError(f"data.replay.prompts: {path}:{n} needs a non-empty `prompt` string.")
        prompts.append(row["prompt"])
    if not prompts:
        raise RecipeError(f"data.replay.prompts: {path} has no prompts; self-replay needs at least one.")
    return prompts


def cache_file(home: Path, base: dict[str, Any], dtype: str, device: str, prompts: list[str], data: Any) -> Path:
    """Where the answers of this base (as loaded), to these prompts, under these settings, are kept."""
    identity = {k: base.get(k) for k in ("name", "gguf_file", "revision", "load_in_4bit", "chat_template")}
    key = json.dumps(
        {
            "base": identity,
            "dtype": dtype,
            "device": device,
            "prompts": prompts,
            "system": data.system_prompt,
            "max_new_tokens": data.replay.max_new_tokens,
        },
        sort_keys=True,
    )
    return home / "replay" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsonl"


def read_cache(path: Path) -> list[dict[str, Any]] | None:
    if not path.is_file():
        return None
    try:
        return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    except ValueError:
        return None  # a foreign or torn file: generated again


def generate_answers(loaded: Any, prompts: list[str], data: Any, path: Path, console: Any = None) -> float:
    """Answer every prompt greedily with the model as loaded (no adapter: the base), write the cache atomically;
    returns the seconds it took."""
    from psft_lite.inference.evaluate import progress_bar
    from psft_lite.inference.generate import generate

    t0 = time.perf_counter()
    system = [{"role": "system", "content": data.system_prompt}] if data.system_prompt else []
    chats = [[*system, {"role": "user", "content": p}] for p in prompts]
    with progress_bar(console, len(chats), "self-replay") as advance:
        advance(0, "the base model's own answers (once per model)")
        gens = generate(loaded, chats, data.replay.max_new_tokens, batch_size=32, progress=advance)
    rows = [{"prompt": p, "completion": g.text, "finished": g.finished} for p, g in zip(prompts, gens)]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return time.perf_counter() - t0


def conversations(
    rows: list[dict[str, Any]], data: Any, finished: bool = True
) -> list[tuple[list[dict[str, str]], str]]:
    """The finished answers (or, with `finished=False`, those cut by the length limit) as chat conversations."""
    system = [{"role": "system", "content": data.system_prompt}] if data.system_prompt else []
    return [
        (
            [*system, {"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}],
            f"self-replay #{i + 1}",
        )
        for i, r in enumerate(rows)
        if bool(r.get("finished")) == finished and r.get("completion", "").strip()
    ]


def encode_answers(tokenizer: Any, rows: list[dict[str, Any]], data: Any) -> tuple[list[Any], Any]:
    """The replay answers as training examples, with their counts. A finished answer is trained with its end of turn;
    one cut by `data.replay.max_new_tokens` would teach the model to stop mid-sentence that way, so it is dropped —
    unless `data.replay.unfinished = "train"`, which trains it up to the cut and no further (for a base model that
    rarely ends a chat turn, whose finished answers are too few to replay)."""
    from psft_lite.data import total_stats
    from psft_lite.data.tokenize import encode_all

    examples, stats = encode_all(tokenizer, conversations(rows, data), data.max_length, "drop")
    if data.replay.unfinished == "train":
        cut, cut_stats = encode_all(
            tokenizer, conversations(rows, data, finished=False), data.max_length, "truncate", open_end=True
        )
        examples, stats = examples + cut, total_stats([stats, cut_stats])
    return examples, stats
