"""Training configuration shared by the ensemble trainer, ground truth and Daunce."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import DunegrassError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class TrainConfig:
    """How to train one model (or each member of an ensemble).

    ``steps`` wins over ``epochs``; epochs count passes over each member's own subset.
    ``weight_decay`` is an L2 term in the gradient for sgd/adam and decoupled for adamw.
    ``warmup`` is a fraction of the steps with a linear ramp before the schedule.
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    steps: int | None = None
    epochs: float | None = 20.0
    batch_size: int = 64
    schedule: str = "constant"
    warmup: float = 0.0

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise DunegrassError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise DunegrassError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not self.lr > 0:
            raise DunegrassError(f"lr must be positive, got {self.lr}")
        if self.batch_size < 1:
            raise DunegrassError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.steps is None and self.epochs is None:
            raise DunegrassError("set either steps or epochs")
        if not 0 <= self.warmup < 1:
            raise DunegrassError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        self.betas = tuple(self.betas)

    def num_steps(self, subset_size: int) -> int:
        if self.steps is not None:
            return int(self.steps)
        return max(1, math.ceil(self.epochs * subset_size / self.batch_size))

    def lr_at(self, step: int, total: int) -> float:
        """Learning rate for step ``step`` (0-based) of ``total``."""
        warm = int(self.warmup * total)
        if step < warm:
            return self.lr * (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * t))
        if self.schedule == "linear":
            return self.lr * (1 - t)
        return self.lr

    def to_dict(self) -> dict:
        """JSON-ready (tuples become lists, so a saved config compares equal after loading)."""
        return {**asdict(self), "betas": list(self.betas)}
