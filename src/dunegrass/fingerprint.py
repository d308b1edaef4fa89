"""Fingerprints that tie a cache to the exact weights and data it was computed from."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .data import TensorData, as_data, iterate_batches, subset


def _update(h, obj: Any) -> None:
    if isinstance(obj, Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        # reshape first: a 0-dim tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, np.ndarray):
        _update(h, torch.from_numpy(np.ascontiguousarray(obj)))
    elif isinstance(obj, Mapping):
        for k in sorted(obj):
            h.update(str(k).encode())
            _update(h, obj[k])
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            _update(h, v)
    else:
        h.update(repr(obj).encode())


def state_fingerprint(state: Mapping[str, Tensor]) -> str:
    """sha256 of every tensor of a state dict (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    _update(h, dict(state))
    return h.hexdigest()


SAMPLED = 1024  # examples hashed from a dataset that is not held in memory as tensors


def data_fingerprint(data: Any, batch_size: int = 64) -> str:
    """n plus a sha256 of the examples: all of them for tensors in memory (hashing is far cheaper than
    featurising them); for any other Dataset, an evenly spread sample of 1024 plus the first and last."""
    data = as_data(data)
    n = len(data)
    h = hashlib.sha256(str(n).encode())
    if isinstance(data, TensorData):
        _update(h, data.tensors if isinstance(data.tensors, Mapping) else list(data.tensors))
    else:
        picks = torch.linspace(0, max(n - 1, 0), min(n, SAMPLED)).round().long().unique().tolist()
        for _, batch in iterate_batches(subset(data, picks), batch_size):
            _update(h, batch)
    return f"n={n}:{h.hexdigest()[:32]}"
