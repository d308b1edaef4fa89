"""Per-example gradients: materialised (torch.func) and factorised capture for linear layers."""

from .factorized import LinearLayer, capture_factors, layer_gradients, linear_layers
from .per_sample import (
    FunctionalModel,
    check_finite,
    iter_per_sample_gradients,
    parameter_count,
    per_sample_gradients,
    select_parameters,
)

__all__ = [
    "LinearLayer",
    "capture_factors",
    "layer_gradients",
    "linear_layers",
    "FunctionalModel",
    "check_finite",
    "iter_per_sample_gradients",
    "parameter_count",
    "per_sample_gradients",
    "select_parameters",
]
