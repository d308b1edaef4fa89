"""Dense Johnson-Lindenstrauss projections (TRAK-style): Gaussian N(0, 1/k) and Rademacher ±1/√k.

The d × k matrix is defined block by block: input rows [b·BLOCK, (b+1)·BLOCK) are drawn by a CPU
generator seeded by (seed, b). So the map is the same for any batch size, chunking or device, and a
matrix too large to hold is regenerated on every call (as TRAK's CPU projector does) instead of being
built. When it fits in ``max_cache_bytes`` it is built once and kept.

Streaming: drawing 4·10⁹ normals (d = 10⁶, k = 4096) costs more than multiplying them by a batch of
64 (on one core here: ~25 s against ~19 s), so both are spread over worker threads, and blocks are
multiplied in groups of ~64 MiB (a 64 × 1024 product runs BLAS at a third of the speed of a
64 × 8192 one).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from ..errors import DunegrassError
from ..seeding import derive_seed
from .base import Compressor, canonical_device

BLOCK = 1024  # input rows per generated block; part of the map's definition, never change it
DEFAULT_CACHE_BYTES = 2 << 30
GROUP_BYTES = 64 << 20  # blocks multiplied together when streaming; not part of the map


class DenseJL(Compressor):
    """Shared machinery of the dense projections; subclasses say how a block is drawn (``rng`` names it).

    Args:
        max_cache_bytes: keep the whole d × k matrix when it takes at most this much memory.
        workers: threads that draw groups while streaming (default: torch's thread count).
    """

    rng: ClassVar[str] = ""  # names the generator and transform: part of the map, recorded in config

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        seed: int = 0,
        max_cache_bytes: int = DEFAULT_CACHE_BYTES,
        workers: int | None = None,
    ):
        super().__init__(in_dim, out_dim, seed)
        if workers is not None and workers < 1:
            raise DunegrassError(f"workers must be at least 1, got {workers}")
        self.max_cache_bytes = int(max_cache_bytes)
        self.workers = workers
        self.n_blocks = math.ceil(in_dim / BLOCK)
        self.group_rows = BLOCK * max(1, GROUP_BYTES // (4 * BLOCK * out_dim))
        self._matrix: Tensor | None = None

    @abstractmethod
    def _fill(self, out: Tensor, seed: int) -> None:
        """Fill the contiguous fp32 ``out [rows, out_dim]`` with entries drawn from ``seed`` (already scaled)."""

    def _fill_block(self, out: Tensor, b: int) -> None:
        self._fill(out, derive_seed(self.seed, b))

    def block(self, b: int) -> Tensor:
        """Rows ``b·BLOCK ..`` of the d × k matrix ``[≤BLOCK, k]``, on the CPU."""
        if not 0 <= b < self.n_blocks:
            raise DunegrassError(f"block {b} does not exist; this projection has {self.n_blocks} blocks")
        out = torch.empty(min(BLOCK, self.in_dim - b * BLOCK), self.out_dim)
        self._fill_block(out, b)
        return out

    def matrix(self) -> Tensor:
        """The whole d × k matrix on the CPU (only for dimensions that fit in memory)."""
        out = torch.empty(self.in_dim, self.out_dim)
        self._fill_rows(out, 0, self.in_dim)
        return out

    def _fill_rows(self, out: Tensor, lo: int, hi: int, pool: ThreadPoolExecutor | None = None) -> list:
        """Fill ``out[: hi - lo]`` with rows [lo, hi) (block aligned); on ``pool`` if given (returns futures)."""
        jobs = []
        for b in range(lo // BLOCK, math.ceil(hi / BLOCK)):
            view = out[b * BLOCK - lo : min((b + 1) * BLOCK, hi) - lo]
            if pool is None:
                self._fill_block(view, b)
            else:
                jobs.append(pool.submit(self._fill_block, view, b))
        return jobs

    @property
    def cached(self) -> bool:
        return self.in_dim * self.out_dim * 4 <= self.max_cache_bytes

    def _threads(self) -> int:
        return self.workers or max(1, torch.get_num_threads())

    def prepare(self, device: torch.device | str = "cpu") -> None:
        device = canonical_device(device)
        if self.cached and (self._matrix is None or self._matrix.device != device):
            out = torch.empty(self.in_dim, self.out_dim)
            with ThreadPoolExecutor(self._threads()) as pool:
                for job in self._fill_rows(out, 0, self.in_dim, pool):
                    job.result()
            self._matrix = out.to(device)

    def _compress(self, x: Tensor) -> Tensor:
        if x.layout != torch.strided:
            x = x.to_dense()
        if self.cached:
            self.prepare(x.device)
            return x.to(torch.float32) @ self._matrix
        return self._stream(x)

    def _stream(self, x: Tensor) -> Tensor:
        """``x @ P`` with P regenerated group by group, never held whole.

        ``workers`` threads draw the next groups while this thread multiplies the previous ones in (two
        sets of buffers, used in turn), so drawing overlaps with BLAS without touching the process-wide
        thread settings.
        """
        groups = [(lo, min(lo + self.group_rows, self.in_dim)) for lo in range(0, self.in_dim, self.group_rows)]
        workers = min(self._threads(), len(groups))
        batches = [groups[i : i + workers] for i in range(0, len(groups), workers)]
        bufs = [[torch.empty(self.group_rows, self.out_dim) for _ in range(workers)] for _ in range(2)]
        acc = torch.zeros(x.shape[0], self.out_dim, device=x.device)
        with ThreadPoolExecutor(workers) as pool:

            def draw(i: int) -> list:
                return [pool.submit(self._fill_rows, buf, lo, hi) for buf, (lo, hi) in zip(bufs[i % 2], batches[i])]

            pending = draw(0)
            for i, batch in enumerate(batches):
                for job in pending:
                    job.result()
                pending = draw(i + 1) if i + 1 < len(batches) else []
                for buf, (lo, hi) in zip(bufs[i % 2], batch):
                    acc.addmm_(x[:, lo:hi].to(torch.float32), buf[: hi - lo].to(x.device))
        return acc

    def transpose(self, y: Tensor) -> Tensor:
        """Pᵀy, the adjoint: ``[B, k] -> [B, d]``."""
        if y.ndim != 2 or y.shape[1] != self.out_dim:
            raise DunegrassError(f"{type(self).__name__}.transpose expects [B, {self.out_dim}], got {tuple(y.shape)}")
        y = y.to(torch.float32)
        if self.cached:
            self.prepare(y.device)
            return y @ self._matrix.T
        out = torch.zeros(y.shape[0], self.in_dim, device=y.device)
        for lo in range(0, self.in_dim, self.group_rows):
            hi = min(lo + self.group_rows, self.in_dim)
            m = torch.empty(hi - lo, self.out_dim)
            self._fill_rows(m, lo, hi)
            out[:, lo:hi] = y @ m.to(y.device).T
        return out

    def memory_bytes(self) -> int:
        if self.cached:
            return self.in_dim * self.out_dim * 4
        return self._threads() * self.group_rows * self.out_dim * 4  # each worker's group buffer

    def config(self) -> dict:
        return {**super().config(), "block": BLOCK, "rng": self.rng}


class Gaussian(DenseJL, register="gaussian"):
    """Entries i.i.d. N(0, 1/k): E‖Px‖² = ‖x‖²."""

    rng = "torch-cpu-normal-v1"

    def _fill(self, out: Tensor, seed: int) -> None:
        out.normal_(0.0, 1.0 / math.sqrt(self.out_dim), generator=torch.Generator().manual_seed(seed))


class Rademacher(DenseJL, register="rademacher"):
    """Entries i.i.d. ±1/√k: E‖Px‖² = ‖x‖²."""

    rng = "numpy-pcg64-bits-v1"

    def _fill(self, out: Tensor, seed: int) -> None:
        # Random bytes unpacked to bits are ~4x faster than drawing integers one by one.
        n = out.numel()
        raw = np.random.Generator(np.random.PCG64(seed)).bytes((n + 7) // 8)
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=n)
        scale = 1.0 / math.sqrt(self.out_dim)
        out.copy_(torch.from_numpy(bits).view(out.shape)).mul_(2 * scale).sub_(scale)
