"""Small models for the built-in benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, seed: int = 0) -> nn.Sequential:
    """ReLU MLP ``in_dim -> hidden... -> out_dim`` initialised from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        dims = [in_dim, *hidden]
        for a, b in zip(dims, dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], out_dim))
        return nn.Sequential(*layers)


def logistic_regression(in_dim: int, num_classes: int, seed: int = 0) -> nn.Linear:
    """Multinomial logistic regression (a linear layer on the features)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(in_dim, num_classes)
