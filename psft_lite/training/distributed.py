"""Data parallelism under the standard launchers (torchrun, accelerate launch): one process per device.

A run is distributed when the launcher sets WORLD_SIZE > 1. Every rank builds the same run; the step's
micro-batches are dealt out round-robin, so `train.batch_size` stays the global batch. LoRA gradients are summed
with one all-reduce per optimizer step; because every loss is already weighted by the whole step's trained-token
count (objectives.token_weights), the sum is the exact global token-mean — not a mean of per-rank means. Only rank 0
writes (metrics, checkpoints, adapter) and shows progress.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from psft_lite.core.errors import RecipeError, RunError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    sharded: bool = False  # train.strategy = "fsdp": the model is split across the processes (training/sharding.py)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def evaluates(self) -> bool:
        """Whether this rank runs an evaluation: rank 0 alone, or every rank of a sharded model (each forward is a
        collective, so all must take part; rank 0 still reports)."""
        return self.is_main or self.sharded

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.enabled:
            import torch.distributed as dist

            try:
                dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
            except (RuntimeError, ConnectionError) as e:  # a peer died: fail cleanly instead of a gloo traceback
                raise RunError(
                    f"rank {self.rank}: another process of this distributed run failed ({_first_line(e)})."
                ) from None
        return t

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            try:
                dist.barrier()
            except (RuntimeError, ConnectionError) as e:
                raise RunError(
                    f"rank {self.rank}: another process of this distributed run failed ({_first_line(e)})."
                ) from None

    def broadcast_parameters(self, params: list[torch.nn.Parameter]) -> None:
        """Rank 0's values everywhere (LoRA init is seeded identically, this makes it certain)."""
        if self.enabled:
            import torch.distributed as dist

            for p in params:
                dist.broadcast(p.data, src=0)

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum gradients over ranks in one flat all-reduce (LoRA gradients are megabytes). Sharded, FSDP has already
        reduced them to the mean over ranks: times the number of ranks gives the sum."""
        if not self.enabled:
            return
        if self.sharded:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(self.world)
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        self.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
            offset += n


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def sharded_strategy(strategy: str) -> bool:
    """fsdp asked for by the recipe, or (strategy auto) by `accelerate launch` with an FSDP config."""
    return strategy == "fsdp" or (strategy == "auto" and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true")


def init_from_env(strategy: str = "auto") -> Dist:
    """Join the process group the launcher describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sharded = sharded_strategy(strategy)
    if world <= 1:
        if strategy == "fsdp":
            raise RecipeError(
                'train.strategy = "fsdp" splits the model across processes, but this is one process. Launch one '
                "process per device: torchrun --nproc_per_node 2 -m psft_lite train RECIPE (or accelerate launch "
                '--num_processes 2 -m psft_lite train RECIPE); on one device use train.strategy = "auto".'
            )
        return Dist()
    import torch.distributed as dist

    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        timeout = datetime.timedelta(seconds=int(os.environ.get("PSFT_LITE_DIST_TIMEOUT", "1800")))
        dist.init_process_group(backend=backend, timeout=timeout)
    return Dist(rank, world, local, sharded)


def shutdown(d: Dist) -> None:
    """Leave the process group `init_from_env` joined (a single-process run joined none)."""
    if d.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
