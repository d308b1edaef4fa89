"""Block empirical-Fisher preconditioner in a compressed feature space (algorithms.md §1.1).

For each block l (a column range of the features): F_l = Φ_lᵀΦ_l / n, λ_l = damping · tr(F_l) / k_l,
and the Cholesky factor of F_l + λ_l I computed in float64 (if that matrix is not positive definite in
floating point, its eigenvalues are floored at λ_l first, with a warning); solves are two triangular
solves. ``damping=None`` is the identity (plain inner products, TracIn-style); ``damping="auto"`` sets
one relative damping for every block, Σ_l k_l / Σ_l min(n, k_l) (``auto_damping``), and records it in
``chosen``.

Memory is one group of blocks, not all of them: blocks are accumulated and factorised a group at a time
(as many consecutive blocks as fit in ``memory`` bytes, at least one), reading only those columns of
the feature store, and each factor is written to a ``BlockStore`` — one file per block under the
cache, in RAM when all of them fit in ``memory``, else in a temporary directory. Solving reads the
blocks back one at a time (or keeps them when they fit in ``memory``).

Precision: the Gram matrices accumulate, and the solves run, in ``dtype`` (float32 by default, as
kronfluence does; float64 on request) on ``device``; each block is factorised in float64. Under
``torchrun`` each rank factorises its share of the blocks into the shared cache.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import distributed
from ..errors import DunegrassError
from ..notices import user_stacklevel
from ..store.blocks import BlockStore
from ..store.feature_store import FeatureStore
from .auto_damping import auto_ratio

FISHER_MEMORY = 1 << 30  # bytes of Gram/factor blocks held at once while fitting and solving
MAX_BLOCK_BYTES = 4 << 30  # one float64 k × k block beyond this is a configuration mistake, not a workload


def check_damping(damping: float | str | None) -> None:
    if damping is None or damping == "auto":
        return
    if isinstance(damping, bool) or not isinstance(damping, numbers.Real) or not 0 < damping < math.inf:
        hint = " (did you mean 'auto'?)" if isinstance(damping, str) and damping.strip().lower() == "auto" else ""
        raise DunegrassError(
            f"damping must be a positive finite number, 'auto' (λ per block from the training features) or None "
            f"(null in a config file or flag: plain dot products); got {damping!r}{hint}"
        )


def check_fisher_memory(blocks: Sequence[tuple[int, int]], damping: float | str | None) -> None:
    """Raise if one damped Fisher block would exceed MAX_BLOCK_BYTES in float64 (blocks are processed one
    group at a time, so only the widest matters). Methods call this when they are built."""
    widest = max(b - a for a, b in blocks)
    if damping is not None and widest * widest * 8 > MAX_BLOCK_BYTES:
        raise DunegrassError(
            f"one block of the Fisher is {widest} x {widest} ({widest**2 * 8 / 2**30:.1f} GiB in float64); "
            "use a smaller k per block (GraSS, TRAK, FactGraSS: k=4096; LoGra: k_in/k_out; GradientInfluence: a "
            "smaller compressor size, or per_parameter=True for one block per tensor), or damping=None for dot products"
        )


def _groups(blocks: Sequence[tuple[int, int]], budget: int, itemsize: int) -> list[list[int]]:
    """Consecutive runs of block indices whose k × k matrices fit in ``budget`` bytes (at least one each)."""
    groups: list[list[int]] = []
    used = budget + 1
    for i, (a, b) in enumerate(blocks):
        need = (b - a) ** 2 * itemsize
        if used + need > budget:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += need
    return groups


class BlockPreconditioner:
    """``fit(store)`` then ``solve(features)``: (F_l + λ_l I)⁻¹ φ_l block by block.

    ``memory``: bytes of blocks held at once (default ``FISHER_MEMORY``, 1 GiB); peak memory while
    fitting is about that plus three float64 copies of the block being factorised.
    """

    def __init__(
        self,
        blocks: Sequence[tuple[int, int]],
        damping: float | str | None = 0.1,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        memory: int | None = None,
    ):
        check_damping(damping)
        if dtype not in (torch.float32, torch.float64):
            raise DunegrassError(f"the Fisher's dtype must be float32 or float64, got {dtype}")
        self.blocks = [(int(a), int(b)) for a, b in blocks]
        self.damping, self.dtype, self.device = damping, dtype, torch.device(device)
        self.memory = FISHER_MEMORY if memory is None else int(memory)
        check_fisher_memory(self.blocks, damping)
        self.groups = _groups(self.blocks, self.memory, torch.finfo(dtype).bits // 8)
        # block → the relative damping "auto" set, for every block once fitted (one for all: it depends on n and the ks)
        self.chosen: dict[int, float] = {}
        self.factors: BlockStore | None = None
        self._held: dict[int, Tensor] | None = None
        self.n = 0

    def _total_bytes(self) -> int:
        return sum((b - a) ** 2 for a, b in self.blocks) * (torch.finfo(self.dtype).bits // 8)

    def fit(self, store: FeatureStore, factors: BlockStore | None = None) -> BlockPreconditioner:
        """Accumulate each block's Gram matrix from ``store``'s features and factorise it into ``factors``
        (default: RAM when every block fits in ``memory``, else a temporary directory). Blocks already
        in ``factors`` are kept, so an interrupted fit resumes."""
        self.n = store.n
        if self.damping == "auto":
            ratio = auto_ratio(self.n, [b - a for a, b in self.blocks])
            self.chosen = dict.fromkeys(range(len(self.blocks)), ratio)
        else:
            self.chosen = {}
        if self.damping is None:
            return self
        if factors is None:
            factors = BlockStore(None) if self._total_bytes() <= self.memory else BlockStore.temporary()
        elif distributed.active() and factors.path is None:
            raise DunegrassError("under torch.distributed the Fisher blocks need a cache_dir that all ranks share")
        self.factors, self._held = factors, None
        mine = range(len(self.groups)) if factors.path is None else distributed.my_shards(range(len(self.groups)))
        for group in map(self.groups.__getitem__, mine):
            todo = [i for i in group if not factors.has(i)]
            if todo:
                for i, gram in zip(todo, self._grams(store, todo)):
                    factor, ratio = self._factor(i, gram)
                    factors.write(i, factor.to(self.dtype), {"damping": ratio})
        distributed.barrier()  # every rank reads every block next
        return self

    def _grams(self, store: FeatureStore, todo: list[int]) -> list[Tensor]:
        """Each block's Gram matrix ΦᵀΦ."""
        lo, hi = self.blocks[todo[0]][0], self.blocks[todo[-1]][1]
        grams = [
            torch.zeros(b - a, b - a, dtype=self.dtype, device=self.device)
            for a, b in map(self.blocks.__getitem__, todo)
        ]
        for _, chunk in store.columns(lo, hi):
            f = torch.from_numpy(chunk).to(self.device, self.dtype)
            for i, g in zip(todo, grams):
                a, b = self.blocks[i]
                cols = f[:, a - lo : b - lo]
                g.addmm_(cols.T, cols)
        return grams

    def _factor(self, i: int, gram: Tensor) -> tuple[Tensor, float]:
        """The lower Cholesky factor of F_l + λ_l I (float64), and the relative damping λ_l/(tr(F_l)/k_l)."""
        a, b = self.blocks[i]
        ratio = self.chosen[i] if self.damping == "auto" else self.damping
        fisher = gram.to(torch.float64) / self.n
        lam = ratio * torch.trace(fisher) / (b - a)
        if lam <= 0:  # an all-zero block (a layer the loss never reaches): absolute damping
            lam = torch.tensor(ratio, dtype=torch.float64, device=fisher.device)
        mat = fisher + lam * torch.eye(b - a, dtype=torch.float64, device=fisher.device)
        chol, info = torch.linalg.cholesky_ex(mat)
        if int(info) == 0:
            return chol, float(ratio)
        warnings.warn(
            f"block {a}:{b} of the damped Fisher is not positive definite in floating point; flooring its "
            "eigenvalues at the damping (increase damping to avoid this)",
            stacklevel=user_stacklevel(),
        )
        evals, evecs = torch.linalg.eigh(mat)
        return torch.linalg.cholesky((evecs * evals.clamp_min(float(lam))) @ evecs.T), float(ratio)

    def _factor_of(self, i: int) -> Tensor:
        if self.factors is None:
            raise DunegrassError("the preconditioner has seen no training features; fit it first")
        if self._held is not None and i in self._held:
            return self._held[i]
        factor = self.factors.read(i, self.device).to(self.dtype)
        if self._total_bytes() <= self.memory:  # all blocks fit: keep them for the next solve
            self._held = self._held or {}
            self._held[i] = factor
        return factor

    def solve(self, features: Tensor) -> Tensor:
        """(F + λI)⁻¹ φ for each row of ``features [m, k_total]`` (float32, on ``features``' device)."""
        if self.damping is None:
            return features.to(torch.float32)
        f = features.to(self.device, self.dtype)
        out = torch.empty_like(f)
        for i, (a, b) in enumerate(self.blocks):
            out[:, a:b] = torch.cholesky_solve(f[:, a:b].T, self._factor_of(i)).T
        return out.to(features.device, torch.float32)

    def self_influence(self, store: FeatureStore) -> Tensor:
        """``[n]`` float32 on ``device``: φ_iᵀ (F + λI)⁻¹ φ_i, reading one group of blocks' columns at a time."""
        out = torch.zeros(store.n, dtype=torch.float64, device=self.device)
        groups = [list(range(len(self.blocks)))] if self.damping is None else self.groups
        for group in groups:
            lo, hi = self.blocks[group[0]][0], self.blocks[group[-1]][1]
            factors = None if self.damping is None else [self._factor_of(i) for i in group]
            for start, chunk in store.columns(lo, hi):
                f = torch.from_numpy(chunk).to(self.device, self.dtype)
                total = torch.zeros(f.shape[0], dtype=torch.float64, device=self.device)
                for j, i in enumerate(group):
                    a, b = self.blocks[i][0] - lo, self.blocks[i][1] - lo
                    solved = f[:, a:b] if factors is None else torch.cholesky_solve(f[:, a:b].T, factors[j]).T
                    total += (solved * f[:, a:b]).sum(1).to(torch.float64)
                out[start : start + f.shape[0]] += total
        return out.to(torch.float32)
