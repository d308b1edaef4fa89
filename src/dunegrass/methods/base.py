"""The attributor contract, the same for every method:

- ``fit(train, *, queries=None, cache_dir=None)``: everything that depends on the training set (features,
  a Fisher, an ensemble); resumable from ``cache_dir``. ``queries`` are the queries you will score, for
  methods that use them at fit time (Daunce evaluates them while its members are at hand; the gradient
  methods featurise queries when they score them and need nothing early).
- ``score(queries, top_k=None)``: ``Scores [n_query, n_train]`` (positive = proponent), or with ``top_k``
  each query's top_k largest and smallest (``TopScores``).
- ``self_scores()``: ``Scores [1, n_train]``: each training example's score for itself (row 0), e.g. for
  mislabel detection.
- ``describe()``: a JSON-able dict of the method and its settings.
"""

from __future__ import annotations

import contextlib
import os
import sys
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from ..errors import DunegrassError
from ..fingerprint import weights_signature
from ..modes import eval_mode
from ..options import deprecated
from ..scores import Scores, TopScores
from ..task import Task

__all__ = ["Attributor", "eval_mode"]


class Attributor(ABC):
    """Base class of every method. Scores are ``[n_query, n_train]``, positive = proponent.

    ``model`` and ``task`` are checked when given; a method that reaches its model through a service
    (BlackBoxDaunce) has neither.
    """

    method_name = "attributor"

    def __init__(self, model: nn.Module | None = None, task: Task | None = None, progress: bool | None = None):
        if model is not None and not isinstance(model, nn.Module):
            raise DunegrassError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if task is not None and not isinstance(task, Task):
            raise DunegrassError(
                f"task must be a dunegrass Task (e.g. dg.ClassificationTask()), got {type(task).__name__}"
            )
        self.model = model
        self.task = task
        self.progress = sys.stderr.isatty() if progress is None else bool(progress)
        self.n_train: int | None = None

    @property
    def n_train(self) -> int | None:
        """The number of training examples fitted (None before ``fit``)."""
        return self._n_train

    @n_train.setter
    def n_train(self, n: int | None) -> None:
        # set by every fit: the weights fitted are recorded with it, and checked by every score
        self._n_train, self._weights_checked = n, False
        watched = None if n is None else self._watched_model()
        self._fitted_weights = None if watched is None else weights_signature(watched)

    @contextlib.contextmanager
    def _checked_once(self):
        """``_require_fit`` once for a whole scoring, not again in each of its parts (the weights' check
        reads every weight)."""
        self._require_fit()
        self._weights_checked = True
        try:
            yield
        finally:
            self._weights_checked = False

    def _watched_model(self) -> nn.Module | None:
        """The model whose weights the fit depends on (a local back end's, for black-box Daunce)."""
        return self.model

    def _device(self) -> torch.device:
        """The model's device, where the work runs (the CPU for a model without parameters)."""
        p = next(iter(self.model.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    @abstractmethod
    def fit(self, train: Any, *, queries: Any = None, cache_dir: str | os.PathLike | None = None) -> Attributor:
        """Prepare everything that depends on the training set; resumable from ``cache_dir``."""

    @abstractmethod
    def score(self, queries: Any, top_k: int | None = None) -> Scores | TopScores:
        """Scores ``[n_query, n_train]`` for the query examples (positive = proponent), or their top_k."""

    @abstractmethod
    def self_scores(self) -> Scores:
        """``Scores [1, n_train]``: each training example's score for itself."""

    @abstractmethod
    def describe(self) -> dict:
        """The method and its settings, JSON-able."""

    def _require_fit(self) -> None:
        if self.n_train is None:
            raise DunegrassError(f"{type(self).__name__}: call fit(train) before score()/self_scores()")
        if self._weights_checked or self._fitted_weights is None:
            return
        if weights_signature(self._watched_model()) != self._fitted_weights:
            raise DunegrassError(
                f"{type(self).__name__}: the model's weights changed since fit() (scores would mix what was fitted "
                "with the new weights); call fit() again — with a cache_dir, another one, as the old cache holds "
                "the old weights' results"
            )

    def _fit_args(self, args: tuple, queries: Any, cache_dir: Any, legacy: tuple[str, ...]) -> tuple[Any, Any]:
        """``(queries, cache_dir)``, also from the positional arguments of an earlier release (``legacy`` order),
        which still work for one release with a FutureWarning."""
        if not args:
            return queries, cache_dir
        if len(args) > len(legacy):
            raise DunegrassError(f"{type(self).__name__}.fit takes the training data positionally, nothing else")
        given = dict(zip(legacy, args))
        deprecated(
            "positional " + "/".join(given), "fit(train, queries=..., cache_dir=...)", f"{type(self).__name__}.fit"
        )
        return given.get("queries", queries), given.get("cache_dir", cache_dir)

    @staticmethod
    def _cache_dir(cache_dir: str | os.PathLike | None) -> str | None:
        """``cache_dir`` as a string, or a DunegrassError when it names something that is not a directory."""
        if cache_dir is None:
            return None
        path = os.fspath(cache_dir)
        if os.path.exists(path) and not os.path.isdir(path):
            raise DunegrassError(f"cache_dir {path!r} is a file, not a directory; pass a directory (it is created)")
        return path

    def _self_scores(self, values, stderr=None) -> Scores:
        """``Scores [1, n_train]`` from ``[n_train]`` self-scores."""
        return Scores(
            values.reshape(1, -1),
            None if stderr is None else stderr.reshape(1, -1),
            self.method_name,
            {**self.describe(), "self_scores": True},
        )
