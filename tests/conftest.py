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


def _padded_batch(n: int = 5, t: int = 10, vocab: int = 40, seed: int = 0, side: str = "right") -> dict:
    """Token rows of random length in [3, t], padded on ``side`` with token 0 and attention_mask 0."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, t + 1, (n,), generator=gen)
    tokens = torch.randint(1, vocab, (n, t), generator=gen)
    ids, mask = torch.zeros(n, t, dtype=torch.long), torch.zeros(n, t, dtype=torch.long)
    for i, length in enumerate(lengths.tolist()):
        cols = slice(0, length) if side == "right" else slice(t - length, t)
        ids[i, cols], mask[i, cols] = tokens[i, :length], 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def padded_batch():
    """``padded_batch(n=5, t=10, vocab=40, seed=0, side="right")``: a padded causal-LM batch."""
    return _padded_batch
