"""What Daunce needs from a model it cannot open: fine-tune on examples, and per-example losses.

A back end is a fine-tuning service (a local torch loop, or an OpenAI-compatible HTTP API). Each
member is one fine-tuning job on a subset D_k; its losses −log p(target | prompt) on the training
set and the queries are Daunce's signals (``variant="blackbox"``: plain fine-tuning, no linear term).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch import Tensor

from ...errors import DunegrassError


class JobFailed(DunegrassError):
    """A fine-tuning job ended without a model (failed or cancelled); its member is started again next fit."""


class BlackBoxBackend(ABC):
    """A fine-tuning service. Models are named by string handles (the service's model ids)."""

    paid = False  # a paid service: BlackBoxDaunce prints its plan and asks for confirm=True above a threshold

    @abstractmethod
    def fine_tune(self, train: Any, indices: Tensor, seed: int) -> str:
        """Fine-tune the base model on the examples ``train[indices]`` (order and batches from ``seed``);
        returns the handle of the new model."""

    @abstractmethod
    def losses(self, handle: str, data: Any) -> Tensor:
        """``[n]`` per-example losses −log p(target | prompt) of model ``handle`` on ``data`` (float64)."""

    def start_job(self, train: Any, indices: Tensor, seed: int, name: str | None = None) -> str | None:
        """Start fine-tuning as ``fine_tune`` would and return the job's id, or None (the default) for a
        back end that fine-tunes synchronously. A started job is recorded before it is waited for, so a
        run killed while waiting re-attaches to it instead of paying for a second job. ``name`` (run and
        member) tags the job where the service allows it."""
        return None

    def check(self, data: Any) -> None:
        """Raise a clear error for examples this back end cannot train on or score (before any job)."""
        return None  # every example is accepted unless a subclass says otherwise

    def requests(self, n: int) -> int:
        """Scoring requests one member makes for ``n`` examples (0: not a service)."""
        return 0

    def approx_tokens(self, data: Any, indices: Tensor) -> int | None:
        """Approximate training tokens of one job on ``data[indices]`` (None: not known)."""
        return None

    def wait_job(self, job: str) -> str:
        """Wait for a job from ``start_job`` and return the handle of its model."""
        raise DunegrassError(
            f"{type(self).__name__} starts no asynchronous jobs, so it has no job {job!r} to wait for; a back end "
            "that returns job ids from start_job must also implement wait_job"
        )

    def has_model(self, handle: str) -> bool:
        """Whether ``handle`` can still be evaluated (a service keeps its models; a process may not)."""
        return True

    def config(self) -> dict:
        """JSON-able description, part of the cache's config hash (never holds secrets)."""
        return {"backend": type(self).__name__}
