"""Per-example gradients: materialised (torch.func) and factorised capture (linear, Conv1D and Conv2d layers)."""

from .factorized import FactorLayer, LinearLayer, capture_factors, factor_layers, layer_gradients, linear_layers
from .per_sample import (
    FunctionalModel,
    check_finite,
    iter_per_sample_gradients,
    parameter_count,
    per_sample_gradients,
    select_parameters,
)

__all__ = [
    "FactorLayer",
    "LinearLayer",
    "capture_factors",
    "layer_gradients",
    "factor_layers",
    "linear_layers",
    "FunctionalModel",
    "check_finite",
    "iter_per_sample_gradients",
    "parameter_count",
    "per_sample_gradients",
    "select_parameters",
]
