"""Fingerprints that tie a cache to the exact weights and data it was computed from."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .data import TensorData, as_data, iterate_batches


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


def module_structure(model: nn.Module) -> list[tuple[str, str, str]]:
    """``(name, class, extra_repr)`` of every submodule: what a state dict does not show (a Tanh that became
    a ReLU, a changed stride or epsilon)."""
    return [(name, f"{type(m).__module__}.{type(m).__qualname__}", m.extra_repr()) for name, m in model.named_modules()]


def model_fingerprint(model: nn.Module, state: Mapping[str, Tensor] | None = None) -> str:
    """sha256 of the module structure and of the weights: ``model.state_dict()`` with ``state``'s tensors in
    place of its own (a checkpoint). Code inside a ``forward`` is not seen: change the model's class name or
    the cache directory when you change it."""
    h = hashlib.sha256()
    _update(h, module_structure(model))
    _update(h, {**model.state_dict(), **dict(state or {})})
    return h.hexdigest()


def weights_signature(model: nn.Module) -> tuple:
    """A cheap content signature of ``model``'s floating tensors (parameters and buffers), computed where they
    live with one transfer per device: per tensor its sum, its sum of squares and a position-weighted sum (a
    permutation moves it too). Each tensor is read as rows of ``_ROW`` elements (and a shorter last row),
    each row reduced in float32 or float64 and the rows accumulated in float64 (float32 on MPS): the result
    does not depend on the thread count, and a half-precision edit is not rounded away.

    Unlike ``model_fingerprint`` it reads no byte to the host, so it can be checked at every ``score`` (0.09 s
    for 134M float32 or bfloat16 parameters on this 2-core CPU, a fifth of sha256's time); it catches edits through
    ``.data`` (no version counter moves) and ``load_state_dict`` alike; an edit below float32 rounding of a
    row's sums is not seen. Empty, meta and sparse tensors are skipped; a NaN compares equal to itself."""
    tensors = [
        t
        for t in (*model.parameters(), *model.buffers())
        if t.is_floating_point() and t.numel() and t.layout == torch.strided and not t.is_meta
    ]
    parts = []
    with torch.no_grad():
        for t in tensors:
            flat = t.detach().reshape(-1)
            acc = torch.float32 if flat.device.type == "mps" else torch.float64  # MPS has no float64
            full = flat.numel() - flat.numel() % _ROW
            rows = [flat[:full].view(-1, _ROW)] if full else []
            rows += [flat[full:].view(1, -1)] if full < flat.numel() else []
            total, first = torch.zeros(3, dtype=acc, device=flat.device), 0
            row_weights = _position_weights(sum(block.shape[0] for block in rows), flat.device).to(acc)
            wide = flat.dtype in (torch.float32, torch.float64)
            for block in rows:
                step = block.shape[0] if wide else _ROWS_PER_STEP  # half precision: float32 copies, bounded
                wc = _position_weights(block.shape[1], block.device).to(flat.dtype if wide else torch.float32)
                for start in range(0, block.shape[0], step):
                    chunk = block[start : start + step]
                    chunk = chunk if wide else chunk.float()
                    wr = row_weights[first : first + chunk.shape[0]]
                    first += chunk.shape[0]
                    sums = chunk.sum(1).to(acc)
                    norms = torch.linalg.vector_norm(chunk, dim=1).to(acc)
                    weighted = (chunk @ wc).to(acc)
                    # elementwise and summed: a BLAS dot's order (and result) changes with the thread count
                    total += torch.stack([sums.sum(), (norms * norms).sum(), (wr * weighted).sum()])
            parts.append(total)
    host: dict[int, list[float]] = {}
    for device in {part.device for part in parts}:  # one transfer per device the model spans
        where = [i for i, part in enumerate(parts) if part.device == device]
        host.update(zip(where, torch.stack([parts[i] for i in where]).cpu().double().tolist()))
    return tuple("nan" if v != v else v for i in range(len(parts)) for v in host[i])


_ROW = 1024  # elements per row: each row is reduced by one thread
_ROWS_PER_STEP = 4096  # rows per float32 copy of a half-precision tensor (4M elements, 16 MB)


def _position_weights(n: int, device: torch.device) -> Tensor:
    return 1.5 + torch.sin(torch.arange(n, dtype=torch.float32, device=device) * 1.618)


class RowHasher:
    """sha256 of examples fed batch by batch, one example at a time: the digest does not depend on how the
    examples were batched. Tensors are hashed by their bytes, other per-example values (a list of strings
    that a collate made of a text field) by their repr."""

    def __init__(self):
        self.h = hashlib.sha256()

    def update(self, batch: Any) -> RowHasher:
        columns = _columns(batch)
        rows = next((len(c) for c in columns if isinstance(c, (Tensor, list, tuple))), 1)
        flat = [c.detach().cpu().reshape(rows, -1).contiguous() if isinstance(c, Tensor) else c for c in columns]
        for i in range(rows):
            for c in flat:
                if isinstance(c, Tensor):
                    self.h.update(str(c.dtype).encode())
                    self.h.update(c[i].view(torch.uint8).numpy().tobytes())
                else:
                    self.h.update(repr(c[i] if isinstance(c, (list, tuple)) else c).encode())
        return self

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def _columns(obj: Any) -> list:
    """A batch's per-example columns: its tensors, and lists of plain values (one per example)."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [c for k in sorted(obj) for c in _columns(obj[k])]
    if isinstance(obj, (tuple, list)) and obj and all(isinstance(v, (Tensor, Mapping, tuple, list)) for v in obj):
        return [c for v in obj for c in _columns(v)]
    return [obj]


def own_fingerprint(data: Any) -> str | None:
    """The fingerprint a dataset carries itself (a Hugging Face ``datasets.Dataset``: ``_fingerprint``)."""
    fp = getattr(data, "_fingerprint", None)
    return fp if isinstance(fp, str) and fp else None


def data_fingerprint(data: Any, batch_size: int = 64, read: bool = True) -> str:
    """n plus a sha256 of every example (tensors in memory are hashed whole; any other Dataset is read
    once); a dataset that carries its own fingerprint (Hugging Face's) is named by it instead.

    ``read=False`` reads nothing from a lazily read Dataset (the fingerprint then names only its length
    and type): for callers that hash every example as they read it anyway and check each shard against
    the cache (the gradient engine's ``FeatureStore.check_data``)."""
    data = as_data(data)
    n = len(data)
    if (fp := own_fingerprint(data)) is not None:
        return f"n={n}:dataset:{fp}"
    h = hashlib.sha256(str(n).encode())
    if isinstance(data, TensorData):
        _update(h, data.tensors if isinstance(data.tensors, Mapping) else list(data.tensors))
    elif not read:
        return f"n={n}:streamed:{type(data).__qualname__}"
    else:
        rows = RowHasher()
        for _, batch in iterate_batches(data, batch_size):
            rows.update(batch)
        h.update(rows.hexdigest().encode())
    return f"n={n}:{h.hexdigest()[:32]}"


def hashed_per_shard(data: Any) -> bool:
    """Whether a cache checks ``data`` shard by shard (``data_fingerprint(read=False)`` does not cover it)."""
    return not isinstance(as_data(data), TensorData) and own_fingerprint(data) is None
