"""The attributors users call."""

from .base import Attributor
from .bayesian_influence import BayesianInfluence
from .blackbox import BlackBoxDaunce, LocalBackend, LocalChatBackend, OpenAICompatibleBackend
from .daunce import Daunce
from .factorized import FactGraSS, FactorizedFeaturizer, LoGra
from .featurize import Featurizer, MaterializedFeaturizer
from .gradient import GradientInfluence
from .grass import GraSS, GraSSTRAK
from .kfac import EKFAC, KFAC
from .presets import TRAK, ExactInfluence, TracIn

__all__ = [
    "BayesianInfluence",
    "BlackBoxDaunce",
    "Daunce",
    "EKFAC",
    "KFAC",
    "LocalBackend",
    "LocalChatBackend",
    "OpenAICompatibleBackend",
    "FactGraSS",
    "FactorizedFeaturizer",
    "LoGra",
    "TRAK",
    "Attributor",
    "ExactInfluence",
    "Featurizer",
    "GradientInfluence",
    "GraSS",
    "GraSSTRAK",
    "MaterializedFeaturizer",
    "TracIn",
]
