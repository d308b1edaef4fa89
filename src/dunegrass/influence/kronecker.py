"""Kronecker-factored Fisher blocks, one per layer: K-FAC and EK-FAC (algorithms.md §1.4).

A layer's per-example gradient is G = Σ_t δ_t x̃_tᵀ (``d_out × in_dim``, x̃ = [x; 1] with a bias). K-FAC
approximates the layer's Fisher block by S ⊗ A with

    A = Σ_{n,t} x̃ x̃ᵀ / (number of positions),     S = Σ_{n,t} δ δᵀ / (number of examples)

(kronfluence's normalisation: for one position per example, A = E[x̃x̃ᵀ] and S = E[δδᵀ]; with T
positions S ⊗ A is the "K-FAC expand" approximation of E[vec G vec Gᵀ]). When examples have more than
one position, positions whose output gradient is exactly zero are left out of A: padding, and the last
token of a causal LM (nothing is predicted from it). They add nothing to any gradient; kronfluence
counts the positions of the attention mask instead (the two differ by those last tokens and by
positions where every unit after the layer is dead, a handful in the built-in CNN). With
A = Q_A Λ_A Q_Aᵀ and S = Q_S Λ_S Q_Sᵀ, the eigenvalues of the block are Λ_S[i]·Λ_A[j] (K-FAC), or the
second moments of the gradients rotated into that eigenbasis, E[(Q_Sᵀ G Q_A)²_ij] (EK-FAC's correction,
the best diagonal in that basis in Frobenius norm). Preconditioning rotates G, divides elementwise by
(eigenvalue + λ), and rotates back; λ = damping · mean eigenvalue (kronfluence's heuristic; this is
damping · tr(F)/k, the same relative damping as the block eFIM).

Sums are accumulated in float64; products run in float32 on the layer's device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import DunegrassError


def with_ones(x: Tensor, has_bias: bool) -> Tensor:
    """``[B, T, d_in] -> [B, T, in_dim]``: the constant input of the bias appended when the layer has one."""
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1) if has_bias else x


class KroneckerBlock:
    """One layer's factors: sums while accumulating, then eigendecompositions and eigenvalues.

    The eigenbases are computed once and stored with the factors: recomputing them elsewhere (another
    device or LAPACK) could rotate eigenvectors within near-degenerate eigenspaces, and EK-FAC's
    correction only means something in the basis it was fitted in.
    """

    def __init__(self, in_dim: int, out_dim: int, device: torch.device | str):
        self.A = torch.zeros(in_dim, in_dim, dtype=torch.float64, device=device)
        self.S = torch.zeros(out_dim, out_dim, dtype=torch.float64, device=device)
        self.positions = torch.zeros((), dtype=torch.float64, device=device)
        self.examples = torch.zeros((), dtype=torch.float64, device=device)
        self.calls = torch.zeros((), dtype=torch.float64, device=device)  # most calls of the layer in one batch
        self.correction: Tensor | None = None  # EK-FAC: Σ_n (Q_Sᵀ G_n Q_A)², zeros when its pass starts
        self.QA = self.QS = self.LA = self.LS = self.eigenvalues = None

    # ---- pass 1: covariances
    def add_covariances(self, x: Tensor, delta: Tensor) -> None:
        """``x [B, T, in_dim]`` (ones appended), ``delta [B, T, d_out]`` of one call of the layer."""
        x, delta = x.float(), delta.float()
        if x.shape[1] > 1:  # positions no loss reaches (padding) would only dilute A
            x = x[delta.ne(0).any(-1)]
        else:
            x = x.reshape(-1, x.shape[-1])
        self.A += (x.T @ x).double()
        self.positions += x.shape[0]
        d = delta.reshape(-1, delta.shape[-1])
        self.S += (d.T @ d).double()

    def count_examples(self, n: int) -> None:
        self.examples += n

    def tensors(self) -> dict[str, Tensor]:
        out = {"A": self.A, "S": self.S, "positions": self.positions, "examples": self.examples, "calls": self.calls}
        if self.QA is not None:
            out.update(QA=self.QA, QS=self.QS, LA=self.LA, LS=self.LS)
        if self.correction is not None:
            out["correction"] = self.correction
        return out

    def load(self, tensors: dict[str, Tensor]) -> None:
        self.A, self.S, self.calls = tensors["A"], tensors["S"], tensors["calls"]
        self.positions, self.examples = tensors["positions"], tensors["examples"]
        self.correction = tensors.get("correction")
        if "QA" in tensors:
            self.QA, self.QS, self.LA, self.LS = tensors["QA"], tensors["QS"], tensors["LA"], tensors["LS"]
            self.eigenvalues = torch.outer(self.LS, self.LA)

    # ---- the eigenbasis
    def decompose(self) -> None:
        if float(self.positions) == 0 or float(self.examples) == 0:
            # a layer no loss reaches: zero eigenvalues in any basis (preconditioning falls back to λ alone)
            self.QA = torch.eye(self.A.shape[0], dtype=torch.float64, device=self.A.device)
            self.QS = torch.eye(self.S.shape[0], dtype=torch.float64, device=self.S.device)
            self.LA, self.LS = torch.zeros_like(self.QA[0]), torch.zeros_like(self.QS[0])
        else:
            la, self.QA = torch.linalg.eigh(self.A / self.positions)
            ls, self.QS = torch.linalg.eigh(self.S / self.examples)
            # eigh of a PSD matrix can return tiny negative eigenvalues from rounding
            self.LA, self.LS = la.clamp_min(0), ls.clamp_min(0)
        self.eigenvalues = torch.outer(self.LS, self.LA)

    # ---- pass 2 (EK-FAC): the eigenvalue correction
    def rotate(self, grads: Tensor) -> Tensor:
        """``[B, d_out, in_dim] -> Q_Sᵀ G Q_A`` (float32)."""
        return self.QS.T.float() @ grads.float() @ self.QA.float()

    def add_correction(self, grads: Tensor) -> None:
        """Per-example gradients ``[B, d_out, in_dim]`` of the layer (every call summed)."""
        rotated = self.rotate(grads)
        self.correction += (rotated * rotated).sum(0).double()

    def use_correction(self) -> None:
        if self.correction is None:
            raise DunegrassError("no EK-FAC correction was accumulated")
        self.eigenvalues = self.correction / self.examples

    # ---- preconditioning
    def precondition(self, grads: Tensor, damping: float) -> Tensor:
        """``(F̂ + λI)⁻¹ G`` for ``grads [Q, d_out, in_dim]``, λ = damping · mean eigenvalue (float32)."""
        lam = damping * self.eigenvalues.mean()
        if not lam > 0:  # a layer the loss never reaches: absolute damping keeps the solve defined
            lam = torch.tensor(damping, dtype=torch.float64, device=self.eigenvalues.device)
        scale = (1.0 / (self.eigenvalues + lam)).float()
        return self.QS.float() @ (self.rotate(grads) * scale) @ self.QA.T.float()


def low_rank(grads: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` factors of each ``[Q, d_out, in_dim]`` matrix: ``U [Q, d_out, r]`` (singular values
    folded in) and ``V [Q, in_dim, r]`` with G ≈ U Vᵀ."""
    u, s, vh = torch.linalg.svd(grads.float(), full_matrices=False)
    r = min(rank, s.shape[-1])
    return u[..., :r] * s[..., None, :r], vh[..., :r, :].transpose(-1, -2)


def batch_scores(query: Tensor | tuple[Tensor, Tensor], x: Tensor, delta: Tensor) -> Tensor:
    """``[B, Q]`` inner products ⟨P_q, G_b⟩ of one layer call, G_b = Σ_t δ_t x̃_tᵀ, without forming G_b when
    the queries are low-rank: ⟨U Vᵀ, Σ_t δ_t x̃_tᵀ⟩ = Σ_t Σ_r (δ_tᵀ U_r)(V_rᵀ x̃_t), in two products
    (``[B, T, Q, r]`` each) rather than one four-way contraction with a ``[B, Q, r, in_dim]`` intermediate."""
    x, delta = x.float(), delta.float()
    if isinstance(query, tuple):
        u, v = query
        return (torch.einsum("bto,qor->btqr", delta, u) * torch.einsum("bti,qir->btqr", x, v)).sum((1, 3))
    grads = delta.transpose(1, 2) @ x  # [B, d_out, in_dim]
    return grads.flatten(1) @ query.flatten(1).T
