"""Masks: keep k′ of the d gradient coordinates (a gather, no rescaling).

RandomMask draws a uniformly random, seeded k′-subset. SelectiveMask learns which coordinates
preserve the ranking of gradient inner products (algorithms.md §2) and is saved with its config.
A mask reads only its k′ coordinates, so NaN or inf elsewhere in the input goes unseen (the gradient
code checks whole gradients); in the kept ones it raises NonFiniteError like every compressor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import DunegrassError
from ..seeding import derive_seed
from .base import Compressor, canonical_device

_RANDPERM_LIMIT = 1 << 24  # above this, sample without a d-sized permutation


def random_subset(d: int, k: int, seed: int) -> Tensor:
    """A uniformly random, sorted k-subset of range(d), determined by ``seed`` (int64)."""
    gen = torch.Generator().manual_seed(derive_seed(seed, 0x6D61736B))
    if d <= _RANDPERM_LIMIT:
        return torch.randperm(d, generator=gen)[:k].sort().values
    # Draw with replacement until k distinct values exist; by symmetry the distinct set is a uniform
    # random subset given its size, so a uniform k-subset of it is a uniform k-subset of range(d).
    draws = torch.empty(0, dtype=torch.int64)
    while True:
        draws = torch.cat([draws, torch.randint(0, d, (2 * k,), generator=gen)]).unique()
        if draws.numel() >= k:
            keep = torch.randperm(draws.numel(), generator=gen)[:k]
            return draws[keep].sort().values


class Mask(Compressor):
    """A coordinate selection; subclasses set ``self.indices`` (sorted int64, length out_dim)."""

    indices: Tensor

    def _set_indices(self, indices: Tensor) -> None:
        indices = torch.as_tensor(indices, dtype=torch.int64).flatten()
        if indices.numel() != self.out_dim:
            raise DunegrassError(f"a mask of size {self.out_dim} got {indices.numel()} indices")
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.in_dim):
            raise DunegrassError(f"mask indices must lie in [0, {self.in_dim})")
        if indices.unique().numel() != indices.numel():
            raise DunegrassError("mask indices must be distinct")
        self.indices = indices.sort().values
        self._on: dict[torch.device, Tensor] = {}

    def _require_indices(self) -> None:
        if not hasattr(self, "indices"):
            raise DunegrassError(
                f"this {type(self).__name__} has no coordinates yet; fit it (SelectiveMask.fit) or load it first"
            )

    def _indices_on(self, device: torch.device) -> Tensor:
        self._require_indices()
        if device not in self._on:
            self._on[device] = self.indices.to(device)
        return self._on[device]

    def _compress(self, x: Tensor) -> Tensor:
        idx = self._indices_on(x.device)
        if x.layout != torch.strided:  # index_select has no CSR kernel: go through COO
            return x.to_sparse_coo().index_select(1, idx).to_dense().to(torch.float32)
        return x.index_select(1, idx).to(torch.float32)

    def prepare(self, device: torch.device | str = "cpu") -> None:
        if hasattr(self, "indices"):
            self._indices_on(canonical_device(device))

    def transpose(self, y: Tensor) -> Tensor:
        """Mᵀy: put the k′ values back at their coordinates, zeros elsewhere ``[B, k′] -> [B, d]``."""
        if y.ndim != 2 or y.shape[1] != self.out_dim:
            raise DunegrassError(f"{type(self).__name__}.transpose expects [B, {self.out_dim}], got {tuple(y.shape)}")
        out = torch.zeros(y.shape[0], self.in_dim, dtype=torch.float32, device=y.device)
        out[:, self._indices_on(y.device)] = y.to(torch.float32)
        return out

    def memory_bytes(self) -> int:
        return self.indices.numel() * 8 if hasattr(self, "indices") else 0


class RandomMask(Mask, register="mask"):
    """A fixed, seeded, uniformly random set of k′ coordinates."""

    def __init__(self, in_dim: int, out_dim: int, seed: int = 0):
        super().__init__(in_dim, out_dim, seed)
        self._set_indices(random_subset(in_dim, out_dim, seed))
