"""Shared fixtures: tiny, seeded models and data (fast on 2 CPU cores)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_classification():
    """A 2-layer MLP on 40 random examples of 6 features, 3 classes; returns (model, train, test)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=gen)
    y = torch.randint(0, 3, (40,), generator=gen)
    xq = torch.randn(7, 6, generator=gen)
    yq = torch.randint(0, 3, (7,), generator=gen)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    return model, (x, y), (xq, yq)
