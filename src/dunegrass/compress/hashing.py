"""A counter-based 32-bit hash in plain integer tensor ops: identical on every device.

Values live in int64 tensors but stay below 2**32, and the multipliers are below 2**31, so no
product overflows: the result is exact on CPU and GPU alike (and equal to the NumPy reference in
the tests). The mixer is Wellons' low-bias "triple32"-family hash with two rounds.
"""

from __future__ import annotations

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
_M1 = 0x21F0AAAD
_M2 = 0x735A2D97


def hash32(x: Tensor) -> Tensor:
    """Bijective mix of int64 values in [0, 2**32) to [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _M1) & MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & MASK32
    return x ^ (x >> 15)


def keyed_hash32(index: Tensor, key: int) -> Tensor:
    """A hash of ``index`` (int64, < 2**32) under a 32-bit ``key``: independent-looking streams per key."""
    return hash32((hash32(index) + (key & MASK32)) & MASK32)


def bucket_and_sign(index: Tensor, key: int, k: int) -> tuple[Tensor, Tensor]:
    """Bucket in [0, k) (multiply-high of the top 31 bits, so no modulo bias) and a sign bit (1 = minus)."""
    v = keyed_hash32(index.to(torch.int64), key)
    return ((v >> 1) * k) >> 31, v & 1
