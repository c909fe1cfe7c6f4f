"""Which examples make up each optimizer step, and how a micro-batch becomes tensors.

The data order is a pure function of (seed, epoch, step): resuming at step k needs no saved sampler state, and the
psft snapshot policy can look ahead at the batches of the steps it will serve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from psft_lite.data.tokenize import Example


@dataclass
class DataPlan:
    n_examples: int
    batch_size: int
    micro_batch_size: int
    seed: int
    shuffle: bool = True

    def __post_init__(self) -> None:
        self._perms: dict[int, np.ndarray] = {}

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_examples / self.batch_size)

    def total_steps(self, epochs: float, max_steps: int | None) -> int:
        return max_steps if max_steps is not None else max(1, math.ceil(epochs * self.steps_per_epoch))

    def epoch_of(self, step: int) -> float:
        """Fractional epoch reached after optimizer step `step` (0-based) completes."""
        return (step + 1) / self.steps_per_epoch

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                self._perms = {epoch: rng.permutation(self.n_examples)}
            else:
                self._perms = {epoch: np.arange(self.n_examples)}
        return self._perms[epoch]

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

    @property
    def n_trained(self) -> int:
        return int(self.target_mask.sum())

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.target_mask.to(device), self.index)


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
    return Batch(ids, attn, tmask, list(index))
