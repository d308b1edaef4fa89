"""Scores: a ``[n_query, n_train]`` matrix of attributions, positive = proponent.

A positive score means training on that example helps the query (lowers its loss / raises its
measurement). Optional standard errors (Daunce) have the same shape. Saved as one ``.npz`` without
pickle: the arrays plus the metadata as JSON text.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .errors import DunegrassError
from .store.atomic import atomic_write_bytes


@dataclass
class Scores:
    values: Tensor  # [n_query, n_train]
    stderr: Tensor | None = None  # [n_query, n_train], standard error of each value
    method: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.values = torch.as_tensor(self.values, dtype=torch.float32)
        if self.values.ndim != 2:
            raise DunegrassError(f"scores must be [n_query, n_train], got shape {tuple(self.values.shape)}")
        if self.stderr is not None:
            self.stderr = torch.as_tensor(self.stderr, dtype=torch.float32)
            if self.stderr.shape != self.values.shape:
                raise DunegrassError("stderr must have the same shape as the scores")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)

    def __len__(self) -> int:
        return self.values.shape[0]

    def top(self, k: int = 10) -> tuple[Tensor, Tensor]:
        """Most helpful training examples per query: ``(indices [n_query, k], scores [n_query, k])``."""
        k = min(k, self.values.shape[1])
        vals, idx = torch.topk(self.values, k, dim=1)
        return idx, vals

    def bottom(self, k: int = 10) -> tuple[Tensor, Tensor]:
        """Most harmful training examples (opponents) per query, most negative first."""
        k = min(k, self.values.shape[1])
        vals, idx = torch.topk(self.values, k, dim=1, largest=False)
        return idx, vals

    def z_scores(self) -> Tensor:
        """values / stderr (needs standard errors)."""
        if self.stderr is None:
            raise DunegrassError(f"{self.method or 'these'} scores carry no standard errors")
        return self.values / self.stderr.clamp_min(torch.finfo(torch.float32).tiny)

    def save(self, path: str | os.PathLike) -> None:
        """Write an ``.npz`` (no pickle) atomically."""
        arrays = {"values": self.values.numpy()}
        if self.stderr is not None:
            arrays["stderr"] = self.stderr.numpy()
        meta = json.dumps({"method": self.method, "meta": self.meta, "format": "dunegrass-scores-v1"})
        arrays["meta_json"] = np.frombuffer(meta.encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Scores:
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta_json"]).decode())
                values = torch.from_numpy(z["values"].copy())
                stderr = torch.from_numpy(z["stderr"].copy()) if "stderr" in z else None
        except (OSError, ValueError, KeyError) as e:
            raise DunegrassError(f"cannot read scores from {path}: {e}") from e
        return cls(values, stderr, meta.get("method", ""), meta.get("meta", {}))
