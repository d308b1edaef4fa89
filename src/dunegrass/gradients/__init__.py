"""Per-example gradients: materialised (torch.func) and factorised capture for linear layers."""

from .per_sample import (
    FunctionalModel,
    check_finite,
    parameter_count,
    per_sample_gradients,
    select_parameters,
)

__all__ = ["FunctionalModel", "check_finite", "parameter_count", "per_sample_gradients", "select_parameters"]
