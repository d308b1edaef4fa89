"""torch.distributed helpers: which shards this rank computes, barriers and sums.

Run any ``fit`` under ``torchrun``: each rank featurises the shards ``i`` with ``i % world == rank``
into the shared ``cache_dir`` (per-shard files, so ranks never write the same file), waits for the
others, then reads every shard. The result equals the single-process run (tested with gloo on CPU).
Without an initialised process group everything runs in this process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .errors import DunegrassError


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def my_shards(indices: list[int]) -> list[int]:
    """The part of ``indices`` this rank computes (round robin)."""
    return [i for i in indices if i % world_size() == rank()]


def barrier() -> None:
    if active():
        dist.barrier()


def require_shared_cache(cache_dir) -> None:
    if active() and cache_dir is None:
        raise DunegrassError(
            "under torch.distributed, fit needs a cache_dir on a file system all ranks share: ranks write "
            "their shards there and read the others' shards back"
        )


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (in place, returned for convenience)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
