"""dunegrass: training data attribution — which training examples made a model behave as it does.

import dunegrass as dg
attr = dg.GraSS(model, dg.ClassificationTask(), k=4096).fit(train)
scores = attr.score(queries)        # [n_query, n_train], positive = proponent
"""

from .compress import Compressor, Gaussian, Rademacher, RandomMask, SelectiveMask, SparseJL, compressor
from .data import Padded, TensorData
from .errors import ConfigMismatchError, CorruptCacheError, DunegrassError, NonFiniteError
from .eval import GroundTruth, lds, leave_one_out, loo_correlation, mislabel_auc, subset_retraining
from .methods import (
    EKFAC,
    KFAC,
    TRAK,
    Attributor,
    BayesianInfluence,
    BlackBoxDaunce,
    Daunce,
    ExactInfluence,
    FactGraSS,
    GradientInfluence,
    GraSS,
    LocalBackend,
    LocalChatBackend,
    LoGra,
    OpenAICompatibleBackend,
    TracIn,
)
from .notices import DunegrassWarning
from .options import BayesianInfluenceOptions, DaunceOptions, InfluenceOptions
from .scores import Ranked, Scores, TopScores
from .task import CausalLMTask, ClassificationTask, SequenceClassificationTask, Task
from .train import EnsembleTrainer, LoraConfig, Member, TrainConfig

__version__ = "0.1.0"

__all__ = [
    "TRAK",
    "KFAC",
    "EKFAC",
    "Attributor",
    "BayesianInfluence",
    "BayesianInfluenceOptions",
    "BlackBoxDaunce",
    "CausalLMTask",
    "ClassificationTask",
    "SequenceClassificationTask",
    "Compressor",
    "ConfigMismatchError",
    "CorruptCacheError",
    "Daunce",
    "DaunceOptions",
    "DunegrassError",
    "DunegrassWarning",
    "EnsembleTrainer",
    "ExactInfluence",
    "FactGraSS",
    "LoGra",
    "LoraConfig",
    "LocalBackend",
    "LocalChatBackend",
    "OpenAICompatibleBackend",
    "Padded",
    "Gaussian",
    "GradientInfluence",
    "GraSS",
    "GroundTruth",
    "InfluenceOptions",
    "Member",
    "NonFiniteError",
    "Rademacher",
    "RandomMask",
    "Ranked",
    "Scores",
    "SelectiveMask",
    "SparseJL",
    "Task",
    "TensorData",
    "TopScores",
    "TracIn",
    "TrainConfig",
    "compressor",
    "lds",
    "leave_one_out",
    "loo_correlation",
    "mislabel_auc",
    "subset_retraining",
]
