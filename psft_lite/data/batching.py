"""Which examples make up each optimizer step, and how a micro-batch becomes tensors.

The data order is a pure function of (seed, epoch, step): resuming at step k needs no saved sampler state, and the
psft snapshot policy can look ahead at the batches of the steps it will serve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from psft_lite.data.tokenize import Example


def epoch_draws(
    sizes: list[int], weights: list[float] | None = None, replay: tuple[int, float] | None = None
) -> list[int]:
    """Examples drawn per epoch from each source (and the replay source last, when given as (size, ratio)).

    Without weights every row is drawn once. With weights an epoch draws as many examples as the sources have rows,
    split by the weights (largest remainders, so the counts add up exactly). Replay at ratio r adds r/(1−r) × that
    many base answers, so the user's data is still seen as often as without it and replay is a share r of the epoch.
    """
    total = sum(sizes)
    if weights is None:
        draws = list(sizes)
    else:
        shares = [w / sum(weights) * total for w in weights]
        draws = [int(x) for x in shares]
        for i in sorted(range(len(shares)), key=lambda i: (draws[i] - shares[i], i))[: total - sum(draws)]:
            draws[i] += 1
    if replay is not None and replay[1] > 0:
        draws.append(max(1, round(replay[1] / (1 - replay[1]) * total)))
    return draws


def _interleave(draws: list[int]) -> list[int]:
    """Source labels in the order an epoch draws them, each source spread evenly (every prefix of the epoch holds each
    source at its share, to within one example), so each batch gets its share of every source."""
    order, taken, n = [], [0] * len(draws), sum(draws)
    for t in range(n):
        i = max(range(len(draws)), key=lambda i: (draws[i] * (t + 1) / n - taken[i], -i))
        order.append(i)
        taken[i] += 1
    return order


@dataclass
class DataPlan:
    n_examples: int
    batch_size: int
    micro_batch_size: int
    seed: int
    shuffle: bool = True
    sizes: tuple[int, ...] = ()  # examples per source, in order (they add up to n_examples); () = one source
    draws: tuple[int, ...] = ()  # examples drawn from each source per epoch; () = every row once

    def __post_init__(self) -> None:
        self._perms: dict[int, np.ndarray] = {}
        self.sizes = tuple(self.sizes) or (self.n_examples,)
        self.draws = tuple(self.draws) or self.sizes

    @property
    def epoch_size(self) -> int:
        return sum(self.draws)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.epoch_size / self.batch_size)

    def total_steps(self, epochs: float, max_steps: int | None) -> int:
        return max_steps if max_steps is not None else max(1, math.ceil(epochs * self.steps_per_epoch))

    def epoch_of(self, step: int) -> float:
        """Fractional epoch reached after optimizer step `step` (0-based) completes."""
        return (step + 1) / self.steps_per_epoch

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if self.sizes == self.draws and len(self.sizes) == 1:  # one source, every row once
                if self.shuffle:
                    self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n_examples)}
                else:
                    self._perms = {epoch: np.arange(self.n_examples)}
            else:
                self._perms = {epoch: self._mixed(epoch)}
        return self._perms[epoch]

    def _mixed(self, epoch: int) -> np.ndarray:
        """Each source's draws for `epoch` (continuing through the source's rows across epochs, reshuffled every time
        they are used up), interleaved evenly; global example indices."""
        picks, offset = [], 0
        for i, (size, k) in enumerate(zip(self.sizes, self.draws)):
            start = epoch * k  # this epoch's draws are the source's stream positions [start, start + k)
            rows = []
            for cycle in range(start // size, (start + k - 1) // size + 1):
                perm = (
                    np.random.default_rng([self.seed, i, cycle]).permutation(size) if self.shuffle else np.arange(size)
                )
                rows.append(perm)
            stream = np.concatenate(rows)
            base = (start // size) * size
            picks.append(iter((stream[start - base : start - base + k] + offset).tolist()))
            offset += size
        return np.array([next(picks[i]) for i in _interleave(list(self.draws))], dtype=np.int64)

    def source_of(self, index: int) -> int:
        """Which source an example index belongs to."""
        return int(np.searchsorted(np.cumsum(self.sizes), index, side="right"))

    def step_indices(self, step: int) -> list[int]:
        """Example indices of optimizer step `step` (0-based); the last batch of an epoch may be smaller."""
        epoch, i = divmod(step, self.steps_per_epoch)
        return self._perm(epoch)[i * self.batch_size : (i + 1) * self.batch_size].tolist()

    def micro_batches(self, step: int, lengths: list[int] | np.ndarray) -> list[list[int]]:
        """The step's examples split into micro-batches, sorted by length so each micro-batch pads little."""
        idx = sorted(self.step_indices(step), key=lambda j: (int(lengths[j]), j))
        m = self.micro_batch_size
        return [idx[k : k + m] for k in range(0, len(idx), m)]


@dataclass
class Batch:
    input_ids: torch.Tensor  # long [B, L], right-padded
    attention_mask: torch.Tensor  # long [B, L]
    target_mask: torch.Tensor  # bool [B, L]: token t is a trained target (predicted from position t-1)
    index: list[int]  # example indices, for per-example caches
    position_ids: torch.Tensor | None = None  # long [B, L], restarting at 0 per packed example (None: not packed)
    seq_ids: torch.Tensor | None = None  # long [B, L]: which example of its row a token belongs to (packed)

    @property
    def n_trained(self) -> int:
        return int(self.target_mask.sum())

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for the decoder. Packed rows pass position ids and no 2-D mask: transformers then builds
        a block-diagonal causal mask from the restarts, so no example attends to another (any attention backend)."""
        if self.position_ids is None:
            return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        return {"input_ids": self.input_ids, "position_ids": self.position_ids}

    def to(self, device: torch.device | str) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.target_mask.to(device),
            self.index,
            move(self.position_ids),
            move(self.seq_ids),
        )


@dataclass
class StepData:
    """The training examples and, for each optimizer step, this process's micro-batches as tensors on `device`.
    Micro-batches are dealt round-robin over the `world` processes; counts that normalise the loss are global."""

    examples: list[Example]
    plan: DataPlan
    pad_id: int
    device: torch.device
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        self.lengths = np.array([len(e) for e in self.examples])

    def batches(self, step: int) -> list[Batch]:
        """This rank's micro-batches of optimizer step `step` (all of them in a single process)."""
        return [
            collate([self.examples[i] for i in mb], mb, self.pad_id).to(self.device)
            for mb in self.plan.micro_batches(step, self.lengths)[self.rank :: self.world]
        ]

    def totals(self, step: int) -> tuple[int, int, int]:
        """(trained tokens, sequences, tokens) of the whole step over all ranks."""
        idx = self.plan.step_indices(step)
        ex = self.examples
        return sum(ex[i].n_trained for i in idx), sum(ex[i].n_sequences for i in idx), sum(len(ex[i]) for i in idx)

    def identity(self) -> dict[str, Any]:
        """What fixes the order of examples: a resumed run must see the same (and the same mix)."""
        p = self.plan
        ident = {
            "n_examples": len(self.examples),
            "tokens": int(self.lengths.sum()),
            "batch_size": p.batch_size,
            "seed": p.seed,
            "shuffle": p.shuffle,
        }
        if len(p.sizes) > 1 or p.draws != p.sizes:
            ident.update(sizes=list(p.sizes), draws=list(p.draws))
        return ident


def collate(examples: list[Example], index: list[int], pad_id: int) -> Batch:
    length = max(len(e) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), length), dtype=torch.long)
    tmask = torch.zeros((len(examples), length), dtype=torch.bool)
    for row, e in enumerate(examples):
        n = len(e)
        ids[row, :n] = torch.from_numpy(e.ids.astype(np.int64))
        attn[row, :n] = 1
        tmask[row, :n] = torch.from_numpy(e.mask)
    if not any(e.segments for e in examples):
        return Batch(ids, attn, tmask, list(index))
    pos = torch.zeros((len(examples), length), dtype=torch.long)
    seq = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        start = 0
        for k, n in enumerate([*(e.segments or (len(e),)), length - len(e)]):  # the padding tail is a segment too
            pos[row, start : start + n] = torch.arange(n)
            seq[row, start : start + n] = k
            start += n
    return Batch(ids, attn, tmask, list(index), pos, seq)


def pack_groups(lengths: list[int], max_length: int) -> list[list[int]]:
    """First-fit-decreasing: indices grouped into rows of at most `max_length` tokens, each row in data order and
    the rows in the order of their first index. Deterministic for the same lengths."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        k = next((k for k, r in enumerate(room) if r >= lengths[i]), None)
        if k is None:
            rows.append([i])
            room.append(max_length - lengths[i])
        else:
            rows[k].append(i)
            room[k] -= lengths[i]
    return sorted((sorted(row) for row in rows), key=lambda row: row[0])


def pack_examples(examples: list[Example], max_length: int) -> list[Example]:
    """Short examples concatenated into rows (see `pack_groups`); a row of one example is that example unchanged."""
    out = []
    for row in pack_groups([len(e) for e in examples], max_length):
        members = [examples[i] for i in row]
        if len(members) == 1:
            out.append(members[0])
            continue
        out.append(
            Example(
                np.concatenate([e.ids for e in members]),
                np.concatenate([e.mask for e in members]),
                f"{members[0].where} (+{len(members) - 1} packed)",
                tuple(len(e) for e in members),
            )
        )
    return out
