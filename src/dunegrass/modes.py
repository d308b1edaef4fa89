"""Model modes: run a block in train or eval mode and hand every submodule its own mode back.

Attribution runs in eval mode (no dropout; BatchNorm uses its running statistics and never updates
them); retraining a model with BatchNorm (θ₀, ground truth) runs in train mode, where each member's
running statistics are state that training changes (``running_stat_names``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def module_mode(model: nn.Module, training: bool | None) -> Iterator[nn.Module]:
    """``model`` in train (True) or eval (False) mode for the block, then every submodule back in its own
    mode; None leaves the modes as they are (a model may hold, say, a BatchNorm the caller froze in eval)."""
    modes = [(m, m.training) for m in model.modules()]
    if training is not None:
        model.train(training)
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def eval_mode(model: nn.Module):
    """``module_mode(model, False)``: how every attributor runs the caller's model."""
    return module_mode(model, False)


def running_stat_names(model: nn.Module) -> list[str]:
    """Names of the buffers that training updates: the running statistics of BatchNorm-style layers
    (``track_running_stats=True``). Empty for models without such layers."""
    names = []
    for prefix, module in model.named_modules():
        if getattr(module, "track_running_stats", False) and getattr(module, "running_mean", None) is not None:
            names += [f"{prefix}.{b}" if prefix else b for b, _ in module.named_buffers(recurse=False)]
    return names


def retraining_mode(model: nn.Module) -> bool | None:
    """The mode to retrain ``model`` in, as θ₀ was trained: train mode when it has running statistics
    (BatchNorm normalises with batch statistics), else the modes it is in."""
    return True if running_stat_names(model) else None
