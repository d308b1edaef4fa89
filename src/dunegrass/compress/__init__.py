"""Gradient compressors behind one interface: ``[B, d] -> [B, k]``, seeded, fp32 accumulation."""

from .base import REGISTRY, Compressor, Identity
from .chain import Chain, compressor, describe, parse_spec
from .dense import DenseJL, Gaussian, Rademacher
from .factor_masks import FactorMaskConfig, fit_factor_masks
from .factorized import FactGraSSCompressor, FactorizedCompressor, LoGraCompressor
from .mask import Mask, RandomMask, random_subset
from .selective import SelectiveMask, SelectiveMaskConfig, mask_rank_agreement
from .sjlt import SparseJL

__all__ = [
    "REGISTRY",
    "Chain",
    "Compressor",
    "DenseJL",
    "FactGraSSCompressor",
    "FactorMaskConfig",
    "FactorizedCompressor",
    "Gaussian",
    "Identity",
    "LoGraCompressor",
    "Mask",
    "Rademacher",
    "RandomMask",
    "SelectiveMask",
    "SelectiveMaskConfig",
    "SparseJL",
    "compressor",
    "fit_factor_masks",
    "describe",
    "mask_rank_agreement",
    "parse_spec",
    "random_subset",
]
