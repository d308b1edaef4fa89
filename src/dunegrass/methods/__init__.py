"""The attributors users call."""

from .base import Attributor
from .featurize import Featurizer, MaterializedFeaturizer
from .gradient import GradientInfluence
from .presets import TRAK, ExactInfluence, TracIn

__all__ = [
    "TRAK",
    "Attributor",
    "ExactInfluence",
    "Featurizer",
    "GradientInfluence",
    "MaterializedFeaturizer",
    "TracIn",
]
