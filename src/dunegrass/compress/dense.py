"""Dense Johnson-Lindenstrauss projections (TRAK-style): Gaussian N(0, 1/k) and Rademacher ±1/√k.

The k × d matrix is defined block by block: input columns [b·BLOCK, (b+1)·BLOCK) get their rows from
a CPU generator seeded by (seed, b). So the map is the same for any batch size, chunking or device,
and a matrix too large to hold is regenerated block by block on every call (as TRAK's CPU projector
does) instead of being built. When it fits in ``max_cache_bytes`` it is built once and kept.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from ..seeding import derive_seed
from .base import Compressor

BLOCK = 1024  # input columns per generated block; part of the map's definition, never change it
DEFAULT_CACHE_BYTES = 2 << 30
PREFETCH = 2  # blocks drawn ahead, each on its own thread


class DenseJL(Compressor):
    """Shared machinery of the dense projections; subclasses say how a block is drawn."""

    def __init__(self, in_dim: int, out_dim: int, seed: int = 0, max_cache_bytes: int = DEFAULT_CACHE_BYTES):
        super().__init__(in_dim, out_dim, seed)
        self.max_cache_bytes = int(max_cache_bytes)
        self.n_blocks = math.ceil(in_dim / BLOCK)
        self._matrix: Tensor | None = None

    @abstractmethod
    def _draw(self, rows: int, seed: int) -> Tensor:
        """A ``[rows, out_dim]`` fp32 block with the right distribution (already scaled), from ``seed``."""

    def block(self, b: int) -> Tensor:
        """Rows ``b·BLOCK ..`` of the d × k matrix, on the CPU."""
        rows = min(BLOCK, self.in_dim - b * BLOCK)
        return self._draw(rows, derive_seed(self.seed, b))

    def matrix(self) -> Tensor:
        """The whole d × k matrix (only for dimensions that fit in memory)."""
        return torch.cat([self.block(b) for b in range(self.n_blocks)])

    @property
    def cached(self) -> bool:
        return self.in_dim * self.out_dim * 4 <= self.max_cache_bytes

    def _compress(self, x: Tensor) -> Tensor:
        if x.layout != torch.strided:
            x = x.to_dense()
        if self.cached:
            if self._matrix is None or self._matrix.device != x.device:
                self._matrix = self.matrix().to(x.device)
            return _matmul_fp32(x, self._matrix)
        out = torch.zeros(x.shape[0], self.out_dim, dtype=torch.float32, device=x.device)
        # Generation (single-threaded per generator) dominates: draw blocks ahead on worker threads
        # while the current one is multiplied.
        with ThreadPoolExecutor(max_workers=PREFETCH) as pool:
            pending = [pool.submit(self.block, b) for b in range(min(PREFETCH, self.n_blocks))]
            for b in range(self.n_blocks):
                blk = pending.pop(0).result().to(x.device)
                if b + PREFETCH < self.n_blocks:
                    pending.append(pool.submit(self.block, b + PREFETCH))
                out += _matmul_fp32(x[:, b * BLOCK : b * BLOCK + blk.shape[0]], blk)
        return out

    def memory_bytes(self) -> int:
        if self.cached:
            return self.in_dim * self.out_dim * 4
        return (PREFETCH + 1) * BLOCK * self.out_dim * 4

    def config(self) -> dict:
        return {**super().config(), "block": BLOCK}


def _matmul_fp32(x: Tensor, m: Tensor) -> Tensor:
    return x.to(torch.float32) @ m


class Gaussian(DenseJL, register="gaussian"):
    """Entries i.i.d. N(0, 1/k): E‖Px‖² = ‖x‖²."""

    def _draw(self, rows: int, seed: int) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(rows, self.out_dim, generator=gen).div_(math.sqrt(self.out_dim))


class Rademacher(DenseJL, register="rademacher"):
    """Entries i.i.d. ±1/√k: E‖Px‖² = ‖x‖²."""

    def _draw(self, rows: int, seed: int) -> Tensor:
        # Random bytes unpacked to bits are ~4x faster than drawing integers one by one.
        n = rows * self.out_dim
        raw = np.random.Generator(np.random.PCG64(seed)).bytes((n + 7) // 8)
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[:n]
        scale = 1.0 / math.sqrt(self.out_dim)
        return torch.from_numpy(bits).view(rows, self.out_dim).to(torch.float32).mul_(2 * scale).sub_(scale)
