"""Chains of compressors and the spec strings that build them.

A spec is stages joined by ``>``; a stage is ``name[:k][,option=value...]``::

    "gaussian:4096"                      dense Gaussian JL to 4096
    "mask:16384>sjlt:4096"               GraSS: random mask, then sparse JL
    "selective:16384>sjlt:4096,c=2"      learned mask, then SJLT with 2 non-zeros per coordinate
    "identity"                           no compression

Stage i of a chain gets seed ``derive_seed(seed, i)`` so stages are independent.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import DunegrassError
from ..seeding import derive_seed
from .base import REGISTRY, Compressor


class Chain(Compressor):
    """Apply ``stages`` in order; ``in_dim`` of each is ``out_dim`` of the previous one."""

    allows_expansion = True

    def __init__(self, stages: list[Compressor]):
        if not stages:
            raise DunegrassError("a compressor chain needs at least one stage")
        for a, b in zip(stages, stages[1:]):
            if a.out_dim != b.in_dim:
                raise DunegrassError(f"chain stages do not fit: {a!r} outputs {a.out_dim}, {b!r} takes {b.in_dim}")
        super().__init__(stages[0].in_dim, stages[-1].out_dim, stages[0].seed)
        self.stages = stages

    @property
    def head(self) -> Compressor:
        """The first stage (GraSS's mask)."""
        return self.stages[0]

    def with_head(self, stage: Compressor) -> Chain:
        """This chain with its first stage replaced (e.g. by a learned mask of the same shape)."""
        return Chain([stage, *self.stages[1:]])

    def _compress(self, x: Tensor) -> Tensor:
        for stage in self.stages:
            x = stage._compress(x)
        return x

    def transpose(self, y: Tensor) -> Tensor:
        for stage in reversed(self.stages):
            if not hasattr(stage, "transpose"):
                raise DunegrassError(f"{type(stage).__name__} has no transpose")
            y = stage.transpose(y)
        return y

    def prepare(self, device: torch.device | str = "cpu") -> None:
        for stage in self.stages:
            stage.prepare(device)

    def memory_bytes(self) -> int:
        return sum(s.memory_bytes() for s in self.stages)

    def config(self) -> dict:
        return {"name": "chain", "stages": [s.config() for s in self.stages]}

    def __repr__(self) -> str:
        return " > ".join(repr(s) for s in self.stages)


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> list[tuple[str, int | None, dict]]:
    """``"mask:16384>sjlt:4096,c=2"`` -> ``[("mask", 16384, {}), ("sjlt", 4096, {"c": 2})]``."""
    if not isinstance(spec, str) or not spec.strip():
        raise DunegrassError(f"a compressor spec must be a non-empty string like 'sjlt:4096', got {spec!r}")
    stages = []
    for raw in spec.split(">"):
        head, *opts = raw.strip().split(",")
        name, _, k = head.strip().partition(":")
        if name not in REGISTRY:
            raise DunegrassError(f"unknown compressor {name!r} in spec {spec!r}; known: {', '.join(sorted(REGISTRY))}")
        if k and not k.strip().isdigit():
            raise DunegrassError(f"the size in stage {raw.strip()!r} must be a positive integer")
        options = {}
        for opt in opts:
            key, eq, val = opt.partition("=")
            if not eq:
                raise DunegrassError(f"option {opt!r} in spec {spec!r} must look like name=value")
            options[key.strip()] = _value(val.strip())
        stages.append((name, int(k) if k else None, options))
    return stages


def compressor(spec: str | Compressor, in_dim: int, seed: int = 0, cap: bool = False) -> Compressor:
    """Build the compressor ``spec`` describes for inputs of dimension ``in_dim``: ``[B, in_dim] -> [B, k]``.

    ``cap=True`` caps each stage's size at its input dimension (one spec for blocks of many sizes, e.g. every
    parameter tensor of a model); otherwise a size above it is an error."""
    if isinstance(spec, Compressor):
        if spec.in_dim != in_dim:
            raise DunegrassError(f"the compressor takes inputs of dimension {spec.in_dim}, the gradients have {in_dim}")
        return spec
    stages = []
    dim = in_dim
    parsed = parse_spec(spec)
    for i, (name, k, options) in enumerate(parsed):
        cls = REGISTRY[name]
        if k is None and name != "identity":
            raise DunegrassError(f"stage {name!r} needs an output size, e.g. '{name}:4096'")
        if cap and k is not None:
            k = min(k, dim)
        stage_seed = seed if len(parsed) == 1 else derive_seed(seed, i)
        try:
            stage = cls(dim, k, seed=stage_seed, **options)
        except TypeError as e:
            raise DunegrassError(f"bad options for {name!r} in spec {spec!r}: {e}") from e
        stages.append(stage)
        dim = stage.out_dim
    return stages[0] if len(stages) == 1 else Chain(stages)


def describe(c: Compressor) -> str:
    """A short human-readable name, e.g. 'mask:16384>sjlt:4096'."""
    stages = c.stages if isinstance(c, Chain) else [c]
    return ">".join(f"{s.name}:{s.out_dim}" for s in stages)
