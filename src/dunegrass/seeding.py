"""Deterministic seeds: derive independent streams from (seed, stream ids) with splitmix64."""

from __future__ import annotations

MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, *streams: int) -> int:
    """A 63-bit seed for the stream ``streams`` of ``seed``; equal inputs give equal seeds everywhere."""
    x = splitmix64(seed & MASK64)
    for s in streams:
        x = splitmix64(x ^ (s & MASK64))
    return x >> 1
