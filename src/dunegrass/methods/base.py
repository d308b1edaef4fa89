"""The attributor contract: ``fit(train, cache_dir=None)``, ``score(queries) -> Scores``, ``self_scores()``."""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from typing import Any

from torch import Tensor, nn

from ..errors import DunegrassError
from ..modes import eval_mode
from ..scores import Scores
from ..task import Task

__all__ = ["Attributor", "eval_mode"]


class Attributor(ABC):
    """Base class of every method. Scores are ``[n_query, n_train]``, positive = proponent."""

    method_name = "attributor"

    def __init__(self, model: nn.Module, task: Task, progress: bool | None = None):
        if not isinstance(model, nn.Module):
            raise DunegrassError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(task, Task):
            raise DunegrassError(
                f"task must be a dunegrass Task (e.g. dg.ClassificationTask()), got {type(task).__name__}"
            )
        self.model = model
        self.task = task
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.n_train: int | None = None

    @abstractmethod
    def fit(self, train: Any, cache_dir: str | None = None) -> Attributor:
        """Prepare everything that depends on the training set (features, ensembles); resumable."""

    @abstractmethod
    def score(self, queries: Any) -> Scores:
        """Scores ``[n_query, n_train]`` for the query examples; positive = proponent."""

    @abstractmethod
    def self_scores(self) -> Tensor:
        """``[n_train]``: each training example's influence on itself (for mislabel detection)."""

    def _require_fit(self) -> None:
        if self.n_train is None:
            raise DunegrassError(f"{type(self).__name__}: call fit(train) before score()/self_scores()")
