"""Featurizers turn (weights, batch) into compressed per-example gradient features ``[B, k_total]``.

The materialised featurizer differentiates each example's objective with torch.func and compresses
the flat gradient; the factorised one (FactGraSS/LoGra) never builds it. Both expose ``blocks``:
column ranges that the block preconditioner treats separately.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..compress import Compressor, compressor, describe
from ..errors import DunegrassError
from ..gradients import iter_per_sample_gradients, parameter_count, select_parameters
from ..notices import notice_once
from ..seeding import derive_seed

ObjectiveFn = Callable[[Any, Any], Tensor]  # (model-like, batch) -> [B]


class Featurizer(ABC):
    blocks: list[tuple[int, int]]

    @property
    def dim(self) -> int:
        return self.blocks[-1][1]

    @abstractmethod
    def __call__(self, model: nn.Module, state: Mapping[str, Tensor], batch: Any, objective: ObjectiveFn) -> Tensor:
        """Features ``[B, dim]`` (fp32) of each example's objective under weights ``state``."""

    @abstractmethod
    def config(self) -> dict:
        """JSON-able description for cache hashes."""


CompressorSpec = str | Compressor | Callable[[int, int], Compressor] | None


class MaterializedFeaturizer(Featurizer):
    """Per-example gradients over ``params`` (torch.func), then ``compressor``.

    ``per_parameter=True`` compresses each parameter tensor on its own (one block each, the spec's
    sizes capped at that tensor's size); otherwise the whole flat gradient is one block.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[str] | None,
        spec: CompressorSpec,
        seed: int,
        chunk_size: int = 32,
        per_parameter: bool = False,
    ):
        self.params = select_parameters(model, params)
        self.chunk_size = chunk_size
        self.per_parameter = per_parameter
        self.in_dim = parameter_count(model, self.params)
        sizes = [dict(model.named_parameters())[n].numel() for n in self.params] if per_parameter else [self.in_dim]
        self.compressors = [
            _build(spec, d, derive_seed(seed, i) if per_parameter else seed, cap=per_parameter)
            for i, d in enumerate(sizes)
        ]
        self.in_blocks = _ranges(sizes)
        self.blocks = _ranges([c.out_dim for c in self.compressors])

    def __call__(self, model: nn.Module, state: Mapping[str, Tensor], batch: Any, objective: ObjectiveFn) -> Tensor:
        """Features ``[B, dim]``; each chunk of ``chunk_size`` per-example gradients (``chunk_size × d``
        numbers, the featurizer's memory bound) is compressed before the next one is computed."""
        rows = []
        with _weights(model, state):
            for _, grads in iter_per_sample_gradients(model, objective, batch, self.params, self.chunk_size):
                rows.append(self._compress(grads))
                del grads
        return torch.cat(rows)

    def _compress(self, grads: Tensor) -> Tensor:
        if len(self.compressors) == 1:
            return self.compressors[0](grads)
        return torch.cat([c(grads[:, a:b]) for c, (a, b) in zip(self.compressors, self.in_blocks)], dim=1)

    def config(self) -> dict:
        return {
            "featurizer": "materialized",
            "params": self.params,
            "per_parameter": self.per_parameter,
            "compressors": [c.config() for c in self.compressors],
        }

    def spec(self) -> str:
        """The first block's compressor as a spec string, e.g. ``"mask:16384>sjlt:4096"``."""
        return describe(self.compressors[0])


def default_k(model: nn.Module, params: Sequence[str] | None, default: int, method: str) -> int:
    """``default``, or the number of selected parameters d when that is smaller (said once): a default
    must fit the model it is given."""
    if not isinstance(model, nn.Module):
        return default  # the Attributor names the real problem
    d = parameter_count(model, select_parameters(model, params))
    if d < default:
        notice_once(
            f"default-k:{method}:{d}",
            f"{method}: the model has {d} parameters to attribute, fewer than the default k = {default}; "
            f"using k = {d} (pass k=... to choose)",
        )
    return min(default, d)


def _build(spec: CompressorSpec, in_dim: int, seed: int, cap: bool = False) -> Compressor:
    if spec is None:
        return compressor("identity", in_dim, seed)
    if callable(spec) and not isinstance(spec, (str, Compressor)):
        return spec(in_dim, seed)
    return compressor(spec, in_dim, seed, cap=cap)


def _ranges(sizes: Sequence[int]) -> list[tuple[int, int]]:
    out, lo = [], 0
    for s in sizes:
        out.append((lo, lo + s))
        lo += s
    return out


class _weights:
    """Temporarily load ``state`` (a subset of params/buffers) into ``model``; restore on exit."""

    def __init__(self, model: nn.Module, state: Mapping[str, Tensor]):
        self.model, self.state = model, state

    def __enter__(self):
        if not self.state:
            return self.model
        own = {**dict(self.model.named_parameters(remove_duplicate=False)), **dict(self.model.named_buffers())}
        unknown = [k for k in self.state if k not in own]
        if unknown:
            raise DunegrassError(f"checkpoint holds tensors the model does not have: {unknown[:5]}")
        self.saved = {k: own[k].detach().clone() for k in self.state}
        with torch.no_grad():
            for k, v in self.state.items():
                own[k].copy_(v)
        return self.model

    def __exit__(self, *exc):
        if self.state:
            own = {**dict(self.model.named_parameters(remove_duplicate=False)), **dict(self.model.named_buffers())}
            with torch.no_grad():
                for k, v in self.saved.items():
                    own[k].copy_(v)
        return False


def load_weights(model: nn.Module, state: Mapping[str, Tensor]):
    """Context manager: run with ``state`` loaded into ``model``, then put the original weights back."""
    return _weights(model, state)


__all__ = ["Featurizer", "MaterializedFeaturizer", "load_weights"]
