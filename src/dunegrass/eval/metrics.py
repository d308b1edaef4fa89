"""Metrics that take plain tensors: LDS, LOO correlation, mislabel-detection AUC."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..errors import DunegrassError
from ..scores import Scores
from .ground_truth import GroundTruth


@dataclass
class MeanCI:
    """A mean over queries with its 95 % confidence interval (Student t)."""

    mean: float
    low: float
    high: float
    per_query: np.ndarray

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.half_width:.3f}"


def mean_ci(values: np.ndarray, level: float = 0.95) -> MeanCI:
    from scipy import stats  # imported here: it costs a second at start-up

    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return MeanCI(float("nan"), float("nan"), float("nan"), v)
    m = float(v.mean())
    if v.size < 2:
        return MeanCI(m, m, m, v)
    half = float(stats.t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return MeanCI(m, m - half, m + half, v)


def _values(scores: Scores | Tensor) -> Tensor:
    return (scores.values if isinstance(scores, Scores) else torch.as_tensor(scores)).to(torch.float64)


def _spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of ``a`` with the same row of ``b`` (NaN for constant rows)."""
    from scipy import stats  # imported here: it costs a second at start-up

    ra = stats.rankdata(a, axis=1)
    rb = stats.rankdata(b, axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(1) / den, np.nan)


def lds(scores: Scores | Tensor, ground_truth: GroundTruth) -> MeanCI:
    """Linear datamodeling score: mean over queries of Spearman_j(Σ_{i∈S_j} τ(z, i), −query_loss_j(z)).

    ``scores [n_query, n_train]`` (positive = proponent); the ground truth holds subset masks
    ``[M, n_train]`` and retrained query losses ``[M, n_query]``.
    """
    tau = _values(scores)
    masks = ground_truth.masks.to(torch.float64)
    if tau.shape[1] != masks.shape[1] or tau.shape[0] != ground_truth.values.shape[1]:
        raise DunegrassError(
            f"scores of shape {tuple(tau.shape)} do not match the ground truth "
            f"({ground_truth.values.shape[1]} queries, {masks.shape[1]} training examples)"
        )
    predicted = (tau @ masks.T).numpy()  # [n_query, M]
    actual = (-ground_truth.values.to(torch.float64)).T.numpy()  # higher = better for the query
    return mean_ci(_spearman_rows(predicted, actual))


def loo_correlation(scores: Scores | Tensor, loo_effects: Tensor) -> dict:
    """Agreement of scores with leave-one-out effects, both ``[n_query, n_loo]``.

    Returns the Pearson and Spearman correlation over all pairs and the mean per-query Spearman.
    """
    from scipy import stats  # imported here: it costs a second at start-up

    tau = _values(scores).numpy()
    eff = torch.as_tensor(loo_effects, dtype=torch.float64).numpy()
    if tau.shape != eff.shape:
        raise DunegrassError(f"scores {tau.shape} and LOO effects {eff.shape} must have the same shape")
    return {
        "pearson": float(stats.pearsonr(tau.ravel(), eff.ravel())[0]),
        "spearman": float(stats.spearmanr(tau.ravel(), eff.ravel())[0]),
        "per_query_spearman": mean_ci(_spearman_rows(tau, eff)).mean,
    }


def mislabel_auc(self_scores: Tensor, is_mislabeled: Tensor) -> float:
    """ROC AUC of ranking training examples by self-influence (high first) to find flipped labels."""
    from scipy import stats  # imported here: it costs a second at start-up

    s = torch.as_tensor(self_scores, dtype=torch.float64).numpy()
    y = torch.as_tensor(is_mislabeled).bool().numpy()
    if s.shape != y.shape:
        raise DunegrassError(f"self_scores {s.shape} and labels {y.shape} must have the same shape")
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        raise DunegrassError("mislabel_auc needs both mislabeled and clean examples")
    ranks = stats.rankdata(s)
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))
