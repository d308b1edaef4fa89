"""Training: vmapped ensembles of small models (ground truth, Daunce) and their configuration."""

from .config import TrainConfig
from .ensemble import (
    EnsembleTrainer,
    Member,
    batch_schedule,
    ensemble_outputs,
    member_state,
    reinitialize,
    stack_states,
    trainable_state,
)
from .optim import FunctionalOptimizer

__all__ = [
    "EnsembleTrainer",
    "FunctionalOptimizer",
    "Member",
    "TrainConfig",
    "batch_schedule",
    "ensemble_outputs",
    "member_state",
    "reinitialize",
    "stack_states",
    "trainable_state",
]
