"""Evaluation: retraining ground truth (subsets, leave-one-out) and the metrics that use it."""

from .brittleness import brittleness
from .ground_truth import GroundTruth, leave_one_out, random_subsets, subset_retraining
from .metrics import MeanCI, lds, loo_correlation, mean_ci, mislabel_auc

__all__ = [
    "GroundTruth",
    "brittleness",
    "MeanCI",
    "lds",
    "leave_one_out",
    "loo_correlation",
    "mean_ci",
    "mislabel_auc",
    "random_subsets",
    "subset_retraining",
]
