"""The Compressor interface: a fixed, seeded linear-or-selection map ``[B, in_dim] -> [B, out_dim]``.

Every compressor is a deterministic function of (seed, in_dim, out_dim, its options), accepts any
float dtype, accumulates in fp32 and returns fp32. Subclasses register under a short name used by
spec strings (``"gaussian:4096"``) and configs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import DunegrassError, NonFiniteError

REGISTRY: dict[str, type[Compressor]] = {}


def canonical_device(device: torch.device | str) -> torch.device:
    """``torch.device(device)`` with the current index filled in for a bare accelerator name: tensors
    report "cuda:0", so a per-device cache keyed by "cuda" would otherwise keep a second copy."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class Compressor(ABC):
    """Base class. Subclasses implement ``_compress(x: [B, in_dim] float) -> [B, out_dim] fp32``."""

    name: ClassVar[str] = ""
    allows_expansion: ClassVar[bool] = False

    def __init_subclass__(cls, register: str | None = None, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if register:
            cls.name = register
            REGISTRY[register] = cls

    def __init__(self, in_dim: int, out_dim: int, seed: int = 0):
        if in_dim < 1 or out_dim < 1:
            raise DunegrassError(f"compressor dimensions must be positive, got in_dim={in_dim}, k={out_dim}")
        if out_dim > in_dim and not self.allows_expansion:
            raise DunegrassError(
                f"{type(self).__name__}: k = {out_dim} is larger than the input dimension {in_dim}; "
                f"choose k <= {in_dim} (or use 'identity' to keep the gradient uncompressed)"
            )
        self.in_dim = int(in_dim)
        self.out_dim = int(out_dim)
        self.seed = int(seed)

    def __call__(self, x: Tensor) -> Tensor:
        self._check_input(x)
        y = self._compress(x)
        # A linear map of non-finite input is non-finite; checking the small output is far cheaper
        # than scanning the input (torch.isfinite over [B, d] costs more than the projection).
        if not torch.isfinite(y).all():
            raise NonFiniteError(
                f"{type(self).__name__}: the input holds NaN or inf (or overflows fp32); "
                "check the gradients being compressed"
            )
        return y

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise DunegrassError(
                f"{type(self).__name__} expects input of shape [B, {self.in_dim}], got {tuple(x.shape)}; "
                "flatten per-example gradients to one row each"
            )
        if not x.is_floating_point():
            raise DunegrassError(f"{type(self).__name__} expects a floating-point input, got {x.dtype}")

    @abstractmethod
    def _compress(self, x: Tensor) -> Tensor:
        """Map a validated ``[B, in_dim]`` input to ``[B, out_dim]`` in fp32."""

    def prepare(self, device: torch.device | str = "cpu") -> None:
        """Build, ahead of the first call on ``device``, any state kept between calls (a cached matrix,
        a hash table's copy on that device). Calling it is optional; the first call does it otherwise."""
        return None  # stateless compressors have nothing to build

    def memory_bytes(self) -> int:
        """Bytes of state this compressor holds between calls (matrices, hashes, indices, buffers)."""
        return 0

    def config(self) -> dict:
        return {"name": self.name, "in_dim": self.in_dim, "out_dim": self.out_dim, "seed": self.seed}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.in_dim} -> {self.out_dim}, seed={self.seed})"


class Identity(Compressor, register="identity"):
    """No compression: the gradient itself (in fp32)."""

    allows_expansion = True

    def __init__(self, in_dim: int, out_dim: int | None = None, seed: int = 0):
        if out_dim is not None and out_dim != in_dim:
            raise DunegrassError(f"identity keeps the dimension; got k = {out_dim} for input {in_dim}")
        super().__init__(in_dim, in_dim, seed)

    def _compress(self, x: Tensor) -> Tensor:
        return (x if x.layout == torch.strided else x.to_dense()).to(torch.float32)
