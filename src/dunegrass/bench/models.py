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


def cnn(channels: tuple[int, int] = (8, 16), num_classes: int = 10, size: int = 8, seed: int = 0) -> nn.Sequential:
    """A small BatchNorm CNN on ``[B, 1, size, size]`` images (3 842 parameters for 8×8 digits).

    conv 3×3 (1→c₁, padding 1) + BatchNorm2d + ReLU, conv 3×3 (c₁→c₂, stride 2, padding 1) + BatchNorm2d
    + ReLU, flatten, linear → ``num_classes``. Indices 0 and 3 are the convolutions, 7 the linear head.
    The convolutions have no bias: the BatchNorm after each would cancel it in train mode (its gradient
    is zero there, and Adam would turn the rounding noise into steps). Train it in train mode (batch
    statistics), use it in eval mode (running statistics).
    """
    c1, c2 = channels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(c2 * ((size + 1) // 2) ** 2, num_classes),
        )
