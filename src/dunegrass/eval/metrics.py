"""Metrics that take plain tensors: LDS, LOO correlation, mislabel-detection AUC."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..errors import DunegrassError
from ..scores import Scores, TopScores
from .ground_truth import GroundTruth


@dataclass
class MeanCI:
    """A mean over queries with its 95 % confidence interval (Student t). ``degenerate`` counts the queries
    whose ranking carried no information (constant or NaN scores or ground truth), which count as 0."""

    mean: float
    low: float
    high: float
    per_query: np.ndarray
    degenerate: int = 0

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def __str__(self) -> str:
        note = f" ({self.degenerate} of {len(self.per_query)} queries constant or NaN, counted as 0)"
        return f"{self.mean:.3f} ± {self.half_width:.3f}" + (note if self.degenerate else "")


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
    if isinstance(scores, Scores):
        return scores.values.to(torch.float64)
    if isinstance(scores, TopScores):
        raise DunegrassError(
            "metrics take the scores of every training example, not each query's top_k: score without top_k"
        )
    try:
        return torch.as_tensor(scores, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise DunegrassError(
            f"metrics take the scores of every training example (dg.Scores or a tensor), got {type(scores).__name__}"
        ) from e


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
    ``[M, n_train]`` and retrained query losses ``[M, n_query]``. A query whose predicted or actual
    values are constant (or NaN) across the subsets counts as 0 and is reported in ``degenerate``;
    if every query is, that is an error.
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
    per_query = _spearman_rows(predicted, actual)
    degenerate = ~np.isfinite(per_query)
    if degenerate.all():
        raise DunegrassError(
            f"LDS is undefined: for all {len(per_query)} queries the scores' subset sums or the retrained "
            "measurements are constant (or NaN/inf) across the subsets; check the scores (all zero? infinite?) and the "
            "ground truth"
        )
    # A constant ranking carries no information: it counts as 0 rather than being dropped, which would
    # let a method that scores most queries with zeros report the LDS of the few it got right.
    result = mean_ci(np.where(degenerate, 0.0, per_query))
    result.degenerate = int(degenerate.sum())
    return result


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


def mislabel_auc(self_scores: Scores | Tensor, is_mislabeled: Tensor) -> float:
    """ROC AUC (scikit-learn's ``roc_auc_score``) of ranking training examples by self-influence, high
    first, to find flipped labels. ``self_scores``: what an attributor's ``self_scores()`` returns
    (``Scores [1, n_train]``) or a ``[n_train]`` tensor."""
    from sklearn.metrics import roc_auc_score  # imported here: it costs a second at start-up

    s = _values(self_scores).reshape(-1).numpy()
    y = torch.as_tensor(is_mislabeled).bool().numpy()
    if s.shape != y.shape:
        raise DunegrassError(f"self_scores {s.shape} and labels {y.shape} must have the same shape")
    if y.all() or not y.any():
        raise DunegrassError("mislabel_auc needs both mislabeled and clean examples")
    if not np.isfinite(s).all():
        raise DunegrassError("self_scores hold NaN or inf; an AUC of such a ranking means nothing")
    return float(roc_auc_score(y, s))
