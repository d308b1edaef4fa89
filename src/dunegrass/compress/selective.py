"""SelectiveMask: learn which k′ gradient coordinates preserve the ranking of inner products.

Objective (algorithms.md §2), maximised with Adam over logits S ∈ ℝᵈ, S₀ ~ N(0, 0.01²):

    mean_t corr_i(⟨g_i, g_t⟩, ⟨σ(S)⊙g_i, σ(S)⊙g_t⟩) − λ · mean_j σ(S_j)

on *per-example* gradients (never mini-batch means). The kept mask is the top-k′ of σ(S). Every
``eval_every`` steps the hard mask's rank agreement (mean Spearman over held-out queries) is measured;
the best mask is kept, and training stops when the soft mask's agreement drops below ``threshold``
(the sparsity term has gone too far) or when the hard agreement stops improving.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from ..errors import DunegrassError
from ..seeding import derive_seed
from ..store.atomic import atomic_save_npy, atomic_write_json
from .mask import Mask


@dataclass
class SelectiveMaskConfig:
    reg: float = 0.5  # λ, on the mean of σ(S) so it does not scale with d
    lr: float = 0.05
    max_steps: int = 400
    eval_every: int = 10
    patience: int = 5  # evaluations without improvement before stopping
    threshold: float = 0.9  # stop once the soft mask's rank agreement falls below this


def _pearson_rows(a: Tensor, b: Tensor) -> Tensor:
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)


def _ranks(x: Tensor) -> Tensor:
    return x.argsort(dim=1).argsort(dim=1).to(torch.float32)


def rank_agreement(full: Tensor, masked: Tensor) -> float:
    """Mean over rows of the Spearman correlation between two ``[m, n]`` inner-product matrices."""
    return float(_pearson_rows(_ranks(full), _ranks(masked)).mean())


def mask_rank_agreement(indices: Tensor, train: Tensor, queries: Tensor) -> float:
    """Rank agreement of the inner products restricted to ``indices`` with the full ones."""
    full = queries @ train.T
    return rank_agreement(full, queries[:, indices] @ train[:, indices].T)


class SelectiveMask(Mask, register="selective"):
    """A learned k′-subset of coordinates. Build unfitted, then ``fit`` (or ``load``) before use."""

    def __init__(self, in_dim: int, out_dim: int, seed: int = 0, indices: Tensor | None = None):
        super().__init__(in_dim, out_dim, seed)
        self.history: list[dict] = []
        self.fit_config: dict | None = None
        if indices is not None:
            self._set_indices(indices)

    @property
    def fitted(self) -> bool:
        return hasattr(self, "indices")

    def _compress(self, x: Tensor) -> Tensor:
        if not self.fitted:
            raise DunegrassError(
                "this SelectiveMask has not been fitted; call .fit(per_example_gradients) or "
                "SelectiveMask.load(path) first (dg.GraSS fits it for you during fit)"
            )
        return super()._compress(x)

    def fit(self, grads: Tensor, holdout: Tensor | None = None, config: SelectiveMaskConfig | None = None):
        """Learn the mask from per-example gradients ``grads [n, d]``; monitor on ``holdout [m, d]``.

        Without ``holdout`` a fifth of ``grads`` is held out. Half of the training rows play the
        training examples i and half the queries t. Returns ``self``.
        """
        cfg = config or SelectiveMaskConfig()
        grads = grads.to(torch.float32)
        if grads.ndim != 2 or grads.shape[1] != self.in_dim:
            raise DunegrassError(f"SelectiveMask.fit expects gradients [n, {self.in_dim}], got {tuple(grads.shape)}")
        if holdout is None:
            if grads.shape[0] < 10:
                raise DunegrassError("SelectiveMask.fit needs at least 10 per-example gradients")
            cut = grads.shape[0] * 4 // 5
            grads, holdout = grads[:cut], grads[cut:]
        holdout = holdout.to(torch.float32)
        half = grads.shape[0] // 2
        train_i, train_t = grads[:half], grads[half:]
        target = train_t @ train_i.T
        hold_full = holdout @ grads.T

        gen = torch.Generator().manual_seed(derive_seed(self.seed, 0x73656C))
        logits = (0.01 * torch.randn(self.in_dim, generator=gen)).requires_grad_(True)
        opt = torch.optim.Adam([logits], lr=cfg.lr)
        best, best_idx, stale = -2.0, None, 0
        self.history = []
        for step in range(cfg.max_steps + 1):
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                with torch.no_grad():
                    s2 = torch.sigmoid(logits) ** 2
                    soft = rank_agreement(hold_full, (holdout * s2) @ grads.T)
                    idx = torch.topk(logits, self.out_dim).indices.sort().values
                    hard = rank_agreement(hold_full, holdout[:, idx] @ grads[:, idx].T)
                self.history.append({"step": step, "soft_agreement": soft, "hard_agreement": hard})
                if hard > best:
                    best, best_idx, stale = hard, idx, 0
                else:
                    stale += 1
                if soft < cfg.threshold or stale >= cfg.patience or step == cfg.max_steps:
                    break
            sig = torch.sigmoid(logits)
            corr = _pearson_rows(target, (train_t * sig**2) @ train_i.T).mean()
            loss = -corr + cfg.reg * sig.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.fit_config = asdict(cfg)
        self._set_indices(best_idx)
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Write ``path`` (a directory): indices.npy and config.json, atomically."""
        if not self.fitted:
            raise DunegrassError("cannot save an unfitted SelectiveMask")
        os.makedirs(path, exist_ok=True)
        atomic_save_npy(os.path.join(path, "indices.npy"), self.indices.numpy())
        meta = {**self.config(), "fit": self.fit_config, "history": self.history}
        atomic_write_json(os.path.join(path, "config.json"), meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SelectiveMask:
        try:
            with open(os.path.join(path, "config.json")) as f:
                meta = json.load(f)
            indices = np.load(os.path.join(path, "indices.npy"), allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DunegrassError(f"cannot load a SelectiveMask from {path}: {e}") from e
        mask = cls(meta["in_dim"], meta["out_dim"], meta["seed"], indices=torch.from_numpy(indices))
        mask.fit_config, mask.history = meta.get("fit"), meta.get("history", [])
        return mask
