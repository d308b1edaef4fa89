"""Scores: a ``[n_query, n_train]`` matrix of attributions, positive = proponent, and its top-k form.

A positive score means training on that example helps the query (lowers its loss / raises its
measurement). Optional standard errors (Daunce) have the same shape. Saved as one ``.npz`` without
pickle: the arrays plus the metadata as JSON text.

Methods compute scores chunk by chunk of training examples and hand each chunk to a sink:
``DenseSink`` fills the whole matrix (``n_query × n_train`` float32 on the host), ``TopKSink`` keeps
only each query's K largest and K smallest scores (``n_query × 4K`` numbers, 6K with standard errors,
whatever ``n_train`` is),
so a million training examples can be searched without the dense matrix.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .errors import DunegrassError
from .store.atomic import atomic_write_bytes


class Ranked(NamedTuple):
    """Training examples ranked per query. Note the order: **indices first**, then values (``torch.topk``
    returns values first); both ``[n_query, k]``."""

    indices: Tensor
    values: Tensor


def _rank_count(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise DunegrassError(f"the number of examples to rank must be a positive integer, got {k!r}")
    return k


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _host(t: Tensor | None) -> Tensor | None:
    return None if t is None else torch.as_tensor(t).detach().to("cpu", torch.float32)


@dataclass(eq=False, repr=False)
class Scores:
    values: Tensor  # [n_query, n_train], on the host
    stderr: Tensor | None = None  # [n_query, n_train], standard error of each value
    method: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.values = _host(self.values)
        if self.values.ndim != 2:
            raise DunegrassError(f"scores must be [n_query, n_train], got shape {tuple(self.values.shape)}")
        if self.stderr is not None:
            self.stderr = _host(self.stderr)
            if self.stderr.shape != self.values.shape:
                raise DunegrassError("stderr must have the same shape as the scores")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)

    def __len__(self) -> int:
        return self.values.shape[0]

    def __repr__(self) -> str:  # the method's settings (meta) can run to pages
        errors = ", with stderr" if self.stderr is not None else ""
        return f"Scores(method={self.method!r}, shape={self.shape}{errors})"

    def __eq__(self, other: object) -> bool:
        """Same values and standard errors (NaN equal to NaN), method and metadata."""
        if not isinstance(other, Scores):
            return NotImplemented
        return (
            _same(self.values, other.values)
            and (self.stderr is None) == (other.stderr is None)
            and (self.stderr is None or _same(self.stderr, other.stderr))
            and (self.method, self.meta) == (other.method, other.meta)
        )

    def __getitem__(self, key) -> Tensor:
        """``scores[q]``, ``scores[:, i]``: the values, indexed as the tensor ``scores.values`` is."""
        return self.values[key]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """``np.asarray(scores)``: the values as a NumPy array (float32, shared with ``scores.values``
        unless a copy or another dtype is asked for)."""
        out = self.values.numpy()
        out = out if dtype is None else out.astype(dtype, copy=False)
        return out.copy() if copy else out

    def top(self, k: int = 10) -> Ranked:
        """Most helpful training examples per query, best first: ``Ranked(indices, values)`` (NaN scores last)."""
        k = min(_rank_count(k), self.values.shape[1])
        vals, idx = topk_nan_last(self.values, k, largest=True)
        return Ranked(idx, vals)

    def bottom(self, k: int = 10) -> Ranked:
        """Most harmful training examples (opponents) per query, most negative first (NaN scores last)."""
        k = min(_rank_count(k), self.values.shape[1])
        vals, idx = topk_nan_last(self.values, k, largest=False)
        return Ranked(idx, vals)

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
        _save_npz(path, arrays, {"method": self.method, "meta": self.meta, "format": "dunegrass-scores-v1"})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Scores:
        arrays, meta = _load_npz(path)
        if "values" not in arrays:
            raise DunegrassError(
                f"{path} holds {meta.get('format', 'other')} scores, not dense ones; use TopScores.load"
            )
        return cls(arrays["values"], arrays.get("stderr"), meta.get("method", ""), meta.get("meta", {}))


_TOP_FIELDS = ("top_indices", "top_values", "bottom_indices", "bottom_values", "top_stderr", "bottom_stderr")


@dataclass(eq=False, repr=False)
class TopScores:
    """Each query's ``k`` largest and ``k`` smallest scores (``score(queries, top_k=k)``).

    ``top`` ranks proponents best first, ``bottom`` opponents most negative first; each is a
    ``Ranked(indices [n_query, k], values [n_query, k])``, with standard errors alongside when the
    method has them. ``n_train`` is the size of the training set that was searched.
    """

    top_indices: Tensor
    top_values: Tensor
    bottom_indices: Tensor
    bottom_values: Tensor
    n_train: int
    top_stderr: Tensor | None = None
    bottom_stderr: Tensor | None = None
    method: str = ""
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.top_values.shape[0]

    def __repr__(self) -> str:
        errors = ", with stderr" if self.top_stderr is not None else ""
        k = self.top_values.shape[1]
        return f"TopScores(method={self.method!r}, n_query={len(self)}, k={k}, n_train={self.n_train}{errors})"

    def __eq__(self, other: object) -> bool:
        """Same rankings, scores and standard errors (NaN equal to NaN), method and metadata."""
        if not isinstance(other, TopScores):
            return NotImplemented
        mine, theirs = (getattr(self, f) for f in _TOP_FIELDS), (getattr(other, f) for f in _TOP_FIELDS)
        same = all((a is None) == (b is None) and (a is None or _same(a, b)) for a, b in zip(mine, theirs))
        return same and (self.n_train, self.method, self.meta) == (other.n_train, other.method, other.meta)

    @classmethod
    def from_scores(cls, scores: Scores, k: int) -> TopScores:
        """Each query's ``k`` largest and smallest of dense ``scores`` (with their standard errors)."""
        best, worst = scores.top(k), scores.bottom(k)
        err = (lambda idx: None) if scores.stderr is None else (lambda idx: scores.stderr.gather(1, idx))
        return cls(
            best.indices,
            best.values,
            worst.indices,
            worst.values,
            scores.shape[1],
            err(best.indices),
            err(worst.indices),
            scores.method,
            scores.meta,
        )

    def top(self, k: int | None = None) -> Ranked:
        k = self.top_values.shape[1] if k is None else self._check(k)
        return Ranked(self.top_indices[:, :k], self.top_values[:, :k])

    def bottom(self, k: int | None = None) -> Ranked:
        k = self.bottom_values.shape[1] if k is None else self._check(k)
        return Ranked(self.bottom_indices[:, :k], self.bottom_values[:, :k])

    def _check(self, k: int) -> int:
        k, kept = _rank_count(k), self.top_values.shape[1]
        if kept == self.n_train:  # every training example was kept: nothing more to ask for
            return min(k, kept)
        if k > kept:
            raise DunegrassError(f"these scores kept the top {kept} per query; score again with top_k >= {k}")
        return k

    def save(self, path: str | os.PathLike) -> None:
        arrays = {n: getattr(self, n).numpy() for n in _TOP_FIELDS if getattr(self, n) is not None}
        meta = {"method": self.method, "meta": self.meta, "n_train": self.n_train, "format": "dunegrass-topk-v1"}
        _save_npz(path, arrays, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TopScores:
        arrays, meta = _load_npz(path)
        try:
            return cls(**arrays, n_train=int(meta["n_train"]), method=meta.get("method", ""), meta=meta.get("meta", {}))
        except (TypeError, KeyError) as e:
            raise DunegrassError(f"{path} does not hold top-k scores ({e}); use Scores.load for dense scores") from e


class DenseSink:
    """Collects score chunks into the full ``[n_query, n_train]`` matrix on the host (float32)."""

    def __init__(self, n_query: int, n_train: int, with_stderr: bool = False):
        self.values = torch.empty(n_query, n_train, dtype=torch.float32)
        self.stderr = torch.empty(n_query, n_train, dtype=torch.float32) if with_stderr else None

    def add(self, start: int, values: Tensor, stderr: Tensor | None = None) -> None:
        """Scores of training examples ``[start, start + m)``: ``values [n_query, m]`` on any device."""
        stop = start + values.shape[1]
        self.values[:, start:stop] = values.to("cpu", torch.float32)
        if self.stderr is not None:
            self.stderr[:, start:stop] = stderr.to("cpu", torch.float32)

    def result(self, method: str, meta: dict) -> Scores:
        return Scores(self.values, self.stderr, method, meta)


def topk_nan_last(values: Tensor, k: int, largest: bool) -> tuple[Tensor, Tensor]:
    """``torch.topk`` along dim 1 with NaN ranked after every number (torch ranks it above +inf): a diverged
    score is never a query's top proponent or opponent. Returns (values, positions)."""
    key = torch.where(values.isnan(), float("-inf") if largest else float("inf"), values)
    _, pos = torch.topk(key, k, dim=1, largest=largest)
    return values.gather(1, pos), pos


class TopKSink:
    """Keeps each query's ``k`` largest and ``k`` smallest scores as chunks arrive; ``O(n_query · k)``
    memory on the chunks' device."""

    def __init__(self, n_query: int, n_train: int, k: int, with_stderr: bool = False):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise DunegrassError(f"top_k must be a positive integer, got {k!r}")
        self.n_query, self.n_train, self.k, self.with_stderr = n_query, n_train, min(k, n_train), with_stderr
        self.best: dict[bool, tuple[Tensor, ...] | None] = {True: None, False: None}

    def add(self, start: int, values: Tensor, stderr: Tensor | None = None) -> None:
        values = values.to(torch.float32)
        index = torch.arange(start, start + values.shape[1], device=values.device).expand_as(values)
        err = stderr.to(torch.float32) if self.with_stderr else torch.zeros_like(values)
        for largest in (True, False):
            kept = self.best[largest]
            vals, idx, errs = (
                (values, index, err)
                if kept is None
                else (
                    torch.cat([kept[0], values], 1),
                    torch.cat([kept[1], index], 1),
                    torch.cat([kept[2], err], 1),
                )
            )
            k = min(self.k, vals.shape[1])
            v, pos = topk_nan_last(vals, k, largest)
            self.best[largest] = (v, idx.gather(1, pos), errs.gather(1, pos))

    def result(self, method: str, meta: dict) -> TopScores:
        if self.best[True] is None:
            if self.n_query:
                raise DunegrassError("no scores were computed (empty training set?)")
            empty = torch.empty(0, self.k)
            self.best = {s: (empty, empty.long(), empty) for s in (True, False)}
        (tv, ti, te), (bv, bi, be) = ((t.cpu() for t in self.best[s]) for s in (True, False))
        if not self.with_stderr:
            te = be = None
        return TopScores(ti, tv, bi, bv, self.n_train, te, be, method, meta)


def make_sink(n_query: int, n_train: int, top_k: int | None, with_stderr: bool = False) -> DenseSink | TopKSink:
    """The dense matrix (``top_k=None``) or each query's ``top_k`` proponents and opponents."""
    if top_k is None:
        return DenseSink(n_query, n_train, with_stderr)
    return TopKSink(n_query, n_train, top_k, with_stderr)


def _save_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict) -> None:
    arrays = dict(arrays)
    arrays["meta_json"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _load_npz(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    if not os.path.isfile(path):
        raise DunegrassError(f"cannot read scores from {path}: no such file")
    if not zipfile.is_zipfile(path):  # np.load would say it "contains pickled data"
        raise DunegrassError(f"{path} is not a scores file (an .npz written by Scores.save or TopScores.save)")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta_json"]).decode())
            arrays = {k: torch.from_numpy(z[k].copy()) for k in z.files if k != "meta_json"}
    except (OSError, ValueError, KeyError) as e:
        raise DunegrassError(f"cannot read scores from {path}: {e}") from e
    return arrays, meta


def concat_scores(parts: list[Scores | TopScores], gather: bool = False, device: torch.device | str = "cpu"):
    """Stack per-chunk results along the query dimension; with ``gather``, also every rank's (in rank order),
    exchanging through ``device`` (a CUDA device under NCCL)."""
    from . import distributed

    first = parts[0]
    fields = ("values", "stderr") if isinstance(first, Scores) else _TOP_FIELDS
    merged = {}
    for name in fields:
        if getattr(first, name) is None:
            merged[name] = None
            continue
        pieces = [getattr(p, name) for p in parts]
        t = pieces[0] if len(pieces) == 1 else torch.cat(pieces)  # one chunk: no copy of a large matrix
        merged[name] = distributed.gather_rows(t, device) if gather else t
    if isinstance(first, Scores):
        return Scores(merged["values"], merged["stderr"], first.method, first.meta)
    return TopScores(**merged, n_train=first.n_train, method=first.method, meta=first.meta)
