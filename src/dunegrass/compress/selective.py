"""SelectiveMask: learn which k′ gradient coordinates preserve the ranking of inner products.

Objective (algorithms.md §2), maximised with Adam over logits S ∈ ℝᵈ, S₀ ~ N(0, 0.01²):

    mean_t corr_i(⟨g_i, g_t⟩, ⟨σ(S)⊙g_i, σ(S)⊙g_t⟩) − λ · mean_j σ(S_j)

on *per-example* gradients (never mini-batch means); λ acts on the mean of σ(S) so that it does not
scale with d. The kept mask is the top-k′ of σ(S).

How it is trained, and why:

- Each step draws ``batch_queries`` examples t and ``batch_train`` other examples i from the fitting
  pool. Fresh pairs every step generalise better than one fixed full batch (which overfits its pairs:
  on the MNIST-1D MLP the held-out agreement of a full-batch fit peaked and then fell).
- A fifth of the examples is held out. Every ``eval_every`` steps the *hard* top-k′ mask's rank
  agreement on them (mean Spearman over held-out queries of their inner products with the pool) is
  measured and the best mask so far is kept: the soft objective is only a surrogate of the hard mask
  that is actually used, and for small k′ the hard agreement peaks early.
- Training stops when the *soft* mask's rank agreement on the step's pairs falls below ``threshold``
  (the sparsity term has gone too far; algorithms.md §2), when the hard agreement has not improved by
  ``min_gain`` for ``patience`` evaluations, or after ``max_steps``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from torch import Tensor

from ..errors import DunegrassError, NonFiniteError
from ..seeding import derive_seed
from ..store.atomic import atomic_save_npy, atomic_write_json
from .mask import Mask

MIN_EXAMPLES = 10


@dataclass
class SelectiveMaskConfig:
    reg: float = 0.5  # λ, on the mean of σ(S)
    lr: float = 0.05  # Adam step size on the logits
    max_steps: int = 300
    eval_every: int = 5  # steps between evaluations of the hard mask on the held-out examples
    patience: int = 8  # evaluations without an improvement of at least min_gain before stopping
    min_gain: float = 1e-3
    threshold: float = 0.9  # stop once the soft mask's rank agreement falls below this
    batch_queries: int = 64  # examples t per step
    batch_train: int = 128  # examples i per step


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
    """Rank agreement of the inner products restricted to ``indices`` with the full ones.

    ``train [n, d]`` and ``queries [m, d]`` are per-example gradients; 1.0 means every query ranks the
    training examples exactly as the full gradients do.
    """
    full = queries @ train.T
    return rank_agreement(full, queries[:, indices] @ train[:, indices].T)


class SelectiveMask(Mask, register="selective"):
    """A learned k′-subset of coordinates ``[B, d] -> [B, k′]``.

    Build it unfitted and ``fit`` it on per-example gradients, or load a fitted one: ``indices=``,
    ``SelectiveMask.load(path)``, or ``path=`` (what the spec ``"selective:16384,path=DIR"`` uses).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        seed: int = 0,
        indices: Tensor | None = None,
        path: str | os.PathLike | None = None,
    ):
        super().__init__(in_dim, out_dim, seed)
        self.history: list[dict] = []
        self.fit_config: dict | None = None
        if path is not None:
            loaded = SelectiveMask.load(path)
            if (loaded.in_dim, loaded.out_dim) != (in_dim, out_dim):
                raise DunegrassError(
                    f"the mask saved at {path} maps {loaded.in_dim} -> {loaded.out_dim} coordinates, "
                    f"but {in_dim} -> {out_dim} is needed here; refit it for this model and size"
                )
            indices, self.fit_config, self.history = loaded.indices, loaded.fit_config, loaded.history
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

    def fit(
        self, grads: Tensor, holdout: Tensor | None = None, config: SelectiveMaskConfig | None = None
    ) -> SelectiveMask:
        """Learn the mask from per-example gradients ``grads [n, d]`` (one row per example).

        Training pairs are drawn from ``grads``; the best mask is picked on ``holdout [m, d]`` (their
        inner products with ``grads``). Without ``holdout`` the last fifth of ``grads`` is held out
        (then n ≥ 10). Returns ``self``; ``history`` records every evaluation.
        """
        cfg = config or SelectiveMaskConfig()
        _check_config(cfg)
        if grads.ndim != 2 or grads.shape[1] != self.in_dim:
            raise DunegrassError(f"SelectiveMask.fit expects gradients [n, {self.in_dim}], got {tuple(grads.shape)}")
        need = MIN_EXAMPLES if holdout is None else 4
        if grads.shape[0] < need:
            raise DunegrassError(f"SelectiveMask.fit needs at least {need} per-example gradients, got {grads.shape[0]}")
        grads = grads.to(torch.float32)
        if holdout is None:
            cut = grads.shape[0] * 4 // 5
            grads, holdout = grads[:cut], grads[cut:]
        elif holdout.ndim != 2 or holdout.shape[1] != self.in_dim or holdout.shape[0] < 2:
            raise DunegrassError(f"the holdout must hold at least 2 gradients [m, {self.in_dim}]")
        pool, held = grads, holdout.to(device=grads.device, dtype=torch.float32)
        if not (torch.isfinite(pool).all() and torch.isfinite(held).all()):
            raise NonFiniteError("SelectiveMask.fit: the gradients hold NaN or inf; check the model and data")
        cut = pool.shape[0]
        held_full = held @ pool.T
        n_t = min(cfg.batch_queries, cut // 2)
        n_i = min(cfg.batch_train, cut - n_t)

        # Draws come from a CPU generator so that the same seed fits the same way on any device.
        gen = torch.Generator().manual_seed(derive_seed(self.seed, 0x73656C))
        logits = (0.01 * torch.randn(self.in_dim, generator=gen)).to(pool.device).requires_grad_(True)
        opt = torch.optim.Adam([logits], lr=cfg.lr)
        best, best_idx, stale, soft = -2.0, None, 0, 1.0
        self.history = []
        for step in range(cfg.max_steps + 1):
            if step % cfg.eval_every == 0 or step == cfg.max_steps or soft < cfg.threshold:
                with torch.no_grad():
                    idx = torch.topk(logits, self.out_dim).indices.sort().values
                    hard = rank_agreement(held_full, held[:, idx] @ pool[:, idx].T)
                self.history.append({"step": step, "soft_agreement": soft, "hard_agreement": hard})
                # Any gain updates the kept mask; only a real one (min_gain) resets the patience.
                stale = 0 if hard > best + cfg.min_gain else stale + 1
                if hard > best:
                    best, best_idx = hard, idx
                if soft < cfg.threshold or stale >= cfg.patience or step == cfg.max_steps:
                    break
            perm = torch.randperm(cut, generator=gen).to(pool.device)
            g_t, g_i = pool[perm[:n_t]], pool[perm[n_t : n_t + n_i]]
            target = g_t @ g_i.T
            sig = torch.sigmoid(logits)
            masked = (g_t * sig**2) @ g_i.T  # ⟨σ⊙g_t, σ⊙g_i⟩
            loss = -_pearson_rows(target, masked).mean() + cfg.reg * sig.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            soft = rank_agreement(target, masked.detach())
        self.fit_config = asdict(cfg)
        self._set_indices(best_idx.cpu())
        return self

    def agreement(self, train: Tensor, queries: Tensor) -> float:
        """Rank agreement of this mask on ``train [n, d]`` and ``queries [m, d]`` (see mask_rank_agreement)."""
        if not self.fitted:
            raise DunegrassError("fit or load the SelectiveMask before measuring its agreement")
        return mask_rank_agreement(self.indices.to(train.device), train.to(torch.float32), queries.to(torch.float32))

    def config(self) -> dict:
        out = super().config()
        if self.fitted:  # a learned mask differs by data, not only by seed: caches must see which one
            out["indices_sha256"] = hashlib.sha256(self.indices.numpy().tobytes()).hexdigest()[:16]
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write the directory ``path``: indices.npy and config.json (sizes, seed, fit settings, history)."""
        if not self.fitted:
            raise DunegrassError("cannot save an unfitted SelectiveMask; call fit first")
        os.makedirs(path, exist_ok=True)
        atomic_save_npy(os.path.join(path, "indices.npy"), self.indices.numpy())
        meta = {**self.config(), "fit": self.fit_config, "history": self.history}
        atomic_write_json(os.path.join(path, "config.json"), meta)  # written last: its presence means complete

    @classmethod
    def load(cls, path: str | os.PathLike) -> SelectiveMask:
        """Read a mask written by ``save``; checks that the indices match the recorded digest."""
        try:
            with open(os.path.join(path, "config.json")) as f:
                meta = json.load(f)
            indices = np.load(os.path.join(path, "indices.npy"), allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DunegrassError(f"cannot load a SelectiveMask from {path}: {e}") from e
        mask = cls(meta["in_dim"], meta["out_dim"], meta["seed"], indices=torch.from_numpy(indices))
        if "indices_sha256" in meta and mask.config()["indices_sha256"] != meta["indices_sha256"]:
            raise DunegrassError(f"{path}/indices.npy does not match its config.json; the mask is corrupt, refit it")
        mask.fit_config, mask.history = meta.get("fit"), meta.get("history", [])
        return mask


def _check_config(cfg: SelectiveMaskConfig) -> None:
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in ("reg", "min_gain"):
            ok = value >= 0
        elif f.name == "threshold":
            ok = -1.0 <= value <= 1.0
        else:
            ok = value > 0
        if not ok:
            raise DunegrassError(f"SelectiveMaskConfig.{f.name} = {value} is out of range")
