"""Old-policy log-probs for psft (docs/METHODS.md §2): `snapshot` (the policy at the last refresh) and `base`.

Both run the model with the same numerics as the training forward — train mode, same autocast, the very same
micro-batches (same padding) — so a ratio is exactly 1 wherever the policy has not moved.

- `SnapshotPolicy`: at the first step of each group of K optimizer steps, the current model scores the micro-batches
  of the group's remaining K−1 steps (one no-grad forward per sequence). The group's first step needs no old pass at
  all: its old policy *is* the current model, so its old log-probs are the training forward's own, detached.
- `BasePolicy`: the adapter-disabled model. Its log-probs never change, so each example is scored once (the first
  time it is seen) and cached; after the first epoch psft-base costs what sft costs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any

import torch

from psft_lite.data.batching import Batch
from psft_lite.model.logprobs import Reference
from psft_lite.model.scoring import adapter_disabled, response_logprobs

Score = Callable[[Batch], torch.Tensor]  # batch → logp [B, L] under the current model, no grad


class OldPolicy:
    """Returns, per micro-batch of an optimizer step, old log-probs [B, L] or None (= the current policy itself)."""

    is_base = False  # the old policy is the base model: psft's approx_kl is then minus the drift from the base

    def describe(self) -> str:
        raise NotImplementedError

    def old_logprobs(self, step: int, batches: list[Batch]) -> list[torch.Tensor | None]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class SnapshotPolicy(OldPolicy):
    def __init__(self, score: Score, refresh_every: int, step_batches: Callable[[int], list[Batch]], total_steps: int):
        self.score = score
        self.k = refresh_every
        self.step_batches = step_batches
        self.total_steps = total_steps
        self.cache: dict[int, list[torch.Tensor]] = {}
        self.refreshes = 0

    def describe(self) -> str:
        return f"snapshot, K={self.k}"

    def group_start(self, step: int) -> int:
        return step - step % self.k

    def old_logprobs(self, step: int, batches: list[Batch]) -> list[torch.Tensor | None]:
        start = self.group_start(step)
        if step == start:
            self.refresh(step)
            return [None] * len(batches)
        if step not in self.cache:  # only after a resume into the middle of a group without a saved cache
            raise RuntimeError(f"psft snapshot: no old log-probs for step {step} (group started at step {start})")
        return list(self.cache.pop(step))

    def refresh(self, step: int) -> None:
        """Score the micro-batches of steps step+1 .. step+K−1 with the current (= snapshot) policy."""
        self.cache = {}
        for s in range(step + 1, min(step + self.k, self.total_steps)):
            self.cache[s] = [self.score(b) for b in self.step_batches(s)]
        self.refreshes += 1

    def state_dict(self) -> dict[str, Any]:
        return {"cache": {s: [t.cpu() for t in v] for s, v in self.cache.items()}, "refreshes": self.refreshes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cache = {int(s): list(v) for s, v in state.get("cache", {}).items()}
        self.refreshes = int(state.get("refreshes", 0))


class BasePolicy(OldPolicy):
    is_base = True

    def describe(self) -> str:
        return "base"

    def __init__(self, score: Score, model: Any):
        self.score = score
        self.model = model
        self.cache: dict[int, torch.Tensor] = {}  # example index → base log-probs of its trained tokens (1-D)
        self.scored = 0

    def old_logprobs(self, step: int, batches: list[Batch]) -> list[torch.Tensor | None]:
        return [self._batch(b) for b in batches]

    def _batch(self, b: Batch) -> torch.Tensor:
        mask = b.target_mask
        if any(i not in self.cache for i in b.index):
            with adapter_disabled(self.model):
                logp = self.score(b)
            for row, i in enumerate(b.index):
                self.cache[i] = logp[row][mask[row]].cpu()
            self.scored += len(b.index)
            return logp
        out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        for row, i in enumerate(b.index):
            out[row][mask[row]] = self.cache[i].to(mask.device)
        return out

    def state_dict(self) -> dict[str, Any]:
        """The cache as three flat tensors (fast to save for many examples)."""
        idx = sorted(self.cache)
        return {
            "index": torch.tensor(idx, dtype=torch.long),
            "lengths": torch.tensor([len(self.cache[i]) for i in idx], dtype=torch.long),
            "values": torch.cat([self.cache[i] for i in idx]) if idx else torch.zeros(0),
            "scored": self.scored,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "index" not in state:
            return
        values = state["values"].split(state["lengths"].tolist())
        self.cache = dict(zip(state["index"].tolist(), values))
        self.scored = int(state.get("scored", 0))


def make_scorer(model: Any, amp: Callable[[], Any]) -> Score:
    """No-grad log-probs under the model's current state, with the training forward's numerics."""

    def score(b: Batch) -> torch.Tensor:
        with torch.no_grad(), amp():
            logp, _ = response_logprobs(model, b)
        return logp

    return score


def build_policy(
    objective: Any, model: Any, amp: Callable[[], Any], step_batches: Callable[[int], list[Batch]], total_steps: int
) -> OldPolicy | None:
    """The old policy the objective compares with (`objective.old_policy`), or None when it uses none."""
    from psft_lite.training.objectives import OBJECTIVES

    if not OBJECTIVES[objective.kind].uses_old_policy:
        return None
    score = make_scorer(model, amp)
    if objective.old_policy == "base":
        return BasePolicy(score, model)
    return SnapshotPolicy(score, objective.refresh_every, step_batches, total_steps)


class ReferenceCache:
    """The base model's distribution at each example's trained positions, for the objectives whose loss reads it
    (sft_kl, asft). The base never changes, so an example's reference is computed the first time it is seen (the
    adapter-off forward its micro-batch needs anyway) and reused after: from the second epoch on the reference costs
    no forward through the model. It holds what the loss reads (`logprobs.Reference`): with `objective.reference_top_k`
    = 0 the base's final hidden states (the exact KL: later epochs still run the head over them); with k > 0 also the
    base's top-k tokens, their log-probs and the mass outside them, so no epoch after the first runs the base's head.
    Either equals a fresh forward's up to the float rounding of a different micro-batch's padding.
    Kept in host memory, sized against `objective.reference_cache_mb`, and saved with checkpoints so a resumed run
    keeps it."""

    def __init__(self, top_k: int = 0) -> None:
        self.top_k = top_k
        self.cache: dict[int, Reference] = {}  # example index → its trained positions' reference
        self.hits = 0
        self.misses = 0

    @staticmethod
    def size_bytes(trained_tokens: int, hidden: int, dtype: torch.dtype, top_k: int = 0) -> int:
        states = trained_tokens * hidden * torch.tensor([], dtype=dtype).element_size()
        # with the top-k: an int32 index and a float32 log-prob per token, and the logsumexp and tail mass
        return states + (trained_tokens * (top_k * 8 + 8) if top_k else 0)

    def get(self, b: Batch) -> Reference | None:
        """The micro-batch's reference (its rows' trained positions in row-major order, as the head reads them), or
        None when any example of the micro-batch is not cached yet."""
        if not self.cache or any(i not in self.cache for i in b.index):
            self.misses += 1
            return None
        self.hits += 1
        return Reference.cat([self.cache[i] for i in b.index]).to(b.target_mask.device)

    def put(self, b: Batch, ref: Reference) -> None:
        rows = ref.split(b.target_mask[:, 1:].sum(1).tolist())
        for i, row in zip(b.index, rows):
            if i not in self.cache:
                self.cache[i] = row.to("cpu", copy=True)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.cache.values())

    def state_dict(self) -> dict[str, Any]:
        """The cache as flat tensors, one per field of the reference (fast to save for many examples)."""
        idx = sorted(self.cache)
        state: dict[str, Any] = {
            "reference_top_k": self.top_k,
            "reference_index": torch.tensor(idx, dtype=torch.long),
            "reference_lengths": torch.tensor([len(self.cache[i]) for i in idx], dtype=torch.long),
        }
        if idx:
            state.update({f"reference_{k}": v for k, v in Reference.cat([self.cache[i] for i in idx]).parts().items()})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Read back a saved cache of the same kind (a cache saved with another `reference_top_k` is dropped: it
        refills as the run goes)."""
        if "reference_index" not in state or int(state.get("reference_top_k", 0)) != self.top_k:
            return
        if "reference_values" in state:  # saved before the cache held more than the hidden states
            state = {**state, "reference_hidden": state["reference_values"]}
        names = [f.name for f in fields(Reference)] if self.top_k else ["hidden"]
        if any(f"reference_{n}" not in state for n in names):
            return
        lengths = state["reference_lengths"].tolist()
        rows = Reference(**{n: state[f"reference_{n}"] for n in names}).split(lengths)
        self.cache = dict(zip(state["reference_index"].tolist(), rows))
