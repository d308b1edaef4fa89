"""Training: vmapped ensembles of small models (ground truth, Daunce), a member-by-member loop (optionally
LoRA through peft), exact Newton minimisation for convex models, and their configuration."""

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
from .lora import LoraConfig
from .optim import FunctionalOptimizer

__all__ = [
    "EnsembleTrainer",
    "FunctionalOptimizer",
    "LoraConfig",
    "Member",
    "TrainConfig",
    "batch_schedule",
    "ensemble_outputs",
    "member_state",
    "reinitialize",
    "stack_states",
    "trainable_state",
]
