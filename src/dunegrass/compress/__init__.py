"""Gradient compressors behind one interface: ``[B, d] -> [B, k]``, seeded, fp32 accumulation."""

from .base import REGISTRY, Compressor, Identity
from .chain import Chain, compressor, describe, parse_spec
from .dense import Gaussian, Rademacher
from .mask import RandomMask, random_subset
from .selective import SelectiveMask, SelectiveMaskConfig, mask_rank_agreement
from .sjlt import SparseJL

__all__ = [
    "REGISTRY",
    "Chain",
    "Compressor",
    "Gaussian",
    "Identity",
    "Rademacher",
    "RandomMask",
    "SelectiveMask",
    "SelectiveMaskConfig",
    "SparseJL",
    "compressor",
    "describe",
    "mask_rank_agreement",
    "parse_spec",
    "random_subset",
]
