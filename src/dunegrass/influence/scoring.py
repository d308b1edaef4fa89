"""Chunked scoring: scores[q, i] = Σ_l φ_{q,l}ᵀ (F_l + λ_l I)⁻¹ φ_{i,l}, never holding q × n × k."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

from .preconditioner import BlockPreconditioner


def pairwise_scores(
    queries: Tensor,
    train_chunks: Iterable[tuple[int, np.ndarray | Tensor]],
    n_train: int,
    preconditioner: BlockPreconditioner,
) -> Tensor:
    """``[n_query, n_train]`` scores; train features stream by chunk.

    The smaller side is preconditioned: the queries once when they are fewer than the training
    examples (the usual case), otherwise each training chunk as it arrives.
    """
    queries = queries.to(torch.float32)
    pre_queries = queries.shape[0] <= n_train
    left = preconditioner.solve(queries) if pre_queries else queries
    out = torch.empty(queries.shape[0], n_train, dtype=torch.float32)
    for start, chunk in train_chunks:
        c = torch.as_tensor(chunk).to(torch.float32)
        right = c if pre_queries else preconditioner.solve(c)
        out[:, start : start + c.shape[0]] = left @ right.T
    return out


def self_influence(
    train_chunks: Iterable[tuple[int, np.ndarray | Tensor]], n_train: int, preconditioner: BlockPreconditioner
) -> Tensor:
    """``[n_train]``: φ_iᵀ (F + λI)⁻¹ φ_i for every training example."""
    out = torch.empty(n_train, dtype=torch.float32)
    for start, chunk in train_chunks:
        c = torch.as_tensor(chunk).to(torch.float32)
        out[start : start + c.shape[0]] = (preconditioner.solve(c) * c).sum(dim=1)
    return out
