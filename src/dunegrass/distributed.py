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


def my_rows(n: int) -> tuple[int, int]:
    """This rank's contiguous part ``[lo, hi)`` of ``n`` rows (sizes differ by at most one)."""
    world, r = world_size(), rank()
    return r * n // world, (r + 1) * n // world


def gather_rows(t: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Every rank's ``t [rows_r, ...]`` (rows may differ) concatenated in rank order, on every rank.

    The exchange runs on ``device`` (it must be a CUDA device under NCCL, anything under gloo); the
    result comes back on ``t``'s device.
    """
    if not active():
        return t
    if dist.get_backend() == "nccl" and torch.device(device).type != "cuda":
        raise DunegrassError("gather_rows under NCCL needs a CUDA device for the exchange")
    moved = t.to(device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([moved.shape[0]], dtype=torch.long, device=device))
    rows = [int(s) for s in sizes]
    padded = torch.zeros(max(rows), *moved.shape[1:], dtype=moved.dtype, device=device)
    padded[: moved.shape[0]] = moved
    parts = [torch.empty_like(padded) for _ in rows]
    dist.all_gather(parts, padded)
    return torch.cat([p[:r] for p, r in zip(parts, rows)]).to(t.device)
