"""Block empirical-Fisher preconditioner in a compressed feature space (algorithms.md §1.1).

For each block l (a column range of the features): F_l = Φ_lᵀΦ_l / n, λ_l = damping · tr(F_l) / k_l,
and solves with (F_l + λ_l I) by Cholesky (an eigendecomposition, with a warning, if that fails).
``damping=None`` is the identity (plain inner products, TracIn-style).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import DunegrassError

MAX_FISHER_BYTES = 4 << 30  # float64 k × k blocks beyond this are a configuration mistake, not a workload


def check_fisher_memory(blocks: Sequence[tuple[int, int]], damping: float | None) -> None:
    """Raise if the damped block Fisher of ``blocks`` would exceed MAX_FISHER_BYTES. Methods call this when
    they are built, so a setting that cannot be preconditioned fails before any gradient is computed."""
    need = sum((b - a) ** 2 for a, b in blocks) * 8
    if damping is not None and need > MAX_FISHER_BYTES:
        widest = max(b - a for a, b in blocks)
        raise DunegrassError(
            f"the block Fisher needs {need / 2**30:.1f} GiB of float64 ({len(blocks)} blocks, the widest "
            f"{widest}); compress to a smaller k (compressor='sjlt:4096'; for LoGra / FactGraSS a smaller k, "
            "or k_in / k_out, per layer), use fewer layers (modules=...), or damping=None for plain dot products"
        )


class BlockPreconditioner:
    """Accumulate ΦᵀΦ block by block in float64, then solve with the damped block Fisher."""

    def __init__(self, blocks: Sequence[tuple[int, int]], damping: float | None = 0.1):
        if damping is not None and not damping > 0:
            raise DunegrassError(f"damping must be positive (or None for no preconditioning), got {damping}")
        self.blocks = [(int(a), int(b)) for a, b in blocks]
        self.damping = damping
        check_fisher_memory(self.blocks, damping)
        self.gram = [] if damping is None else [torch.zeros(b - a, b - a, dtype=torch.float64) for a, b in self.blocks]
        self.n = 0
        self._factors: list | None = None

    def update(self, features: Tensor | np.ndarray) -> None:
        """Add rows ``[m, k_total]`` to the Fisher estimate."""
        if self.damping is None:
            self.n += features.shape[0]
            return
        f = torch.as_tensor(features).to(torch.float64)
        for (a, b), g in zip(self.blocks, self.gram):
            g += f[:, a:b].T @ f[:, a:b]
        self.n += f.shape[0]
        self._factors = None

    def fit(self, chunks: Iterable[Tensor | np.ndarray]) -> BlockPreconditioner:
        for chunk in chunks:
            self.update(chunk)
        return self

    def _factorize(self) -> list:
        if self.n == 0:
            raise DunegrassError("the preconditioner has seen no training features; fit it first")
        factors = []
        for (a, b), g in zip(self.blocks, self.gram):
            fisher = g / self.n
            lam = self.damping * torch.trace(fisher) / (b - a)
            if lam <= 0:
                lam = torch.tensor(self.damping, dtype=torch.float64)
            mat = fisher + lam * torch.eye(b - a, dtype=torch.float64)
            chol, info = torch.linalg.cholesky_ex(mat)
            if int(info) == 0:
                factors.append(("chol", chol))
                continue
            warnings.warn(
                f"block {a}:{b} of the damped Fisher is not positive definite; using an eigendecomposition "
                "(increase damping to avoid this)",
                stacklevel=3,
            )
            evals, evecs = torch.linalg.eigh(mat)
            factors.append(("eig", (evals.clamp_min(float(lam)), evecs)))
        return factors

    def solve(self, features: Tensor) -> Tensor:
        """(F + λI)⁻¹ φ for each row of ``features [m, k_total]``, block by block (fp32 out)."""
        if self.damping is None:
            return features.to(torch.float32)
        if self._factors is None:
            self._factors = self._factorize()
        f = features.to(torch.float64)
        out = torch.empty_like(f)
        for (a, b), (kind, fac) in zip(self.blocks, self._factors):
            rhs = f[:, a:b].T
            if kind == "chol":
                out[:, a:b] = torch.cholesky_solve(rhs, fac).T
            else:
                evals, evecs = fac
                out[:, a:b] = (evecs @ ((evecs.T @ rhs) / evals[:, None])).T
        return out.to(torch.float32)
