"""Daunce through a fine-tuning service: K plain fine-tunes on random subsets, covariance of losses."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ...data import as_data
from ...errors import DunegrassError
from ...fingerprint import data_fingerprint
from ...options import DaunceOptions
from ...store.signals import SignalStore
from ..base import Attributor
from ..covariance_scoring import CovarianceScoring
from ..daunce_objectives import draw_members
from .base import BlackBoxBackend
from .openai_api import PromptCompletions


def _dataset(data: Any) -> Any:
    """Prompt/completion dicts become a PromptCompletions dataset; anything else goes through as_data."""
    if isinstance(data, (list, tuple)) and data and all(isinstance(ex, Mapping) for ex in data):
        return PromptCompletions(list(data))
    return as_data(data)


PENDING = "pending-job:"  # prefix of a stored handle that is a started job's id, not yet a model


class BlackBoxDaunce(CovarianceScoring, Attributor):
    """Daunce's ``blackbox`` variant with any BlackBoxBackend (algorithms.md §3): an Attributor like the
    others, whose model lives behind the back end.

    Member k is a fine-tune of the service's base model on D_k (ratio ``subsample_ratio``, drawn as
    by ``dg.Daunce`` with the same seed); its signals are the service's per-example losses. Scores
    ``[n_query, n_train]`` are the covariance across members, positive = proponent, with standard
    errors. Each member's handle and losses are stored as it finishes (``cache_dir``): a killed run
    resumes at the next member, and new queries are scored from the handles without fine-tuning.
    """

    method_name = "daunce-blackbox"

    def __init__(
        self,
        backend: BlackBoxBackend,
        *,
        num_models: int = 32,
        subsample_ratio: float = 0.3,
        seed: int = 0,
        progress: bool | None = None,
    ):
        if not isinstance(backend, BlackBoxBackend):
            raise DunegrassError(f"backend must be a BlackBoxBackend, got {type(backend).__name__}")
        super().__init__(progress=progress)
        # the same checks as dg.Daunce's (the members are drawn the same way)
        DaunceOptions(num_models=num_models, subsample_ratio=subsample_ratio, seed=seed)
        self.backend, self.num_models, self.ratio, self.seed = backend, num_models, float(subsample_ratio), seed
        self.store: SignalStore | None = None

    def describe(self) -> dict:
        return {
            "method": self.method_name,
            "num_models": self.num_models,
            "subsample_ratio": self.ratio,
            "seed": self.seed,
            "backend": self.backend.config(),
        }

    def fit(
        self, train: Any, *args: Any, queries: Any = None, cache_dir: str | os.PathLike | None = None
    ) -> BlackBoxDaunce:
        """Fine-tune the K members (or resume); ``train``: tensors, a Dataset, or prompt/completion dicts."""
        queries, cache_dir = self._fit_args(args, queries, cache_dir, ("queries", "cache_dir"))
        data = _dataset(train)
        # K is not part of the key: member k is the same for any K, so a cache grows (each member is a paid job)
        config = {**{k: v for k, v in self.describe().items() if k != "num_models"}, "data": data_fingerprint(data)}
        path = self._cache_dir(cache_dir)
        self.store = store = SignalStore(path, config, self.num_models, len(data), 1)
        self.train_data, self.n_train = data, len(data)
        members = draw_members(len(data), self.num_models, self.ratio, self.seed)
        for lo, _ in tqdm(store.missing_groups(), desc="daunce: fine-tunes", disable=not self.progress):
            handle = store.load_handle(lo) if store.has_handle(lo) else None
            if handle is not None and handle.startswith(PENDING):  # a job started before a kill: wait for it
                handle = self.backend.wait_job(handle[len(PENDING) :])
                store.save_handle(lo, handle)
            # A member fine-tuned before a kill whose losses were not stored yet is reused when the back end
            # still has it (a service does; LocalBackend's members died with the process: train it again).
            if handle is None or not self.backend.has_model(handle):
                handle = self._fine_tune(data, members[lo], lo)
            store.write_group(lo, self._losses(handle, data, lo)[None])
        if queries is not None:
            self.signals(queries)
        return self

    def _fine_tune(self, data: Any, member, lo: int) -> str:
        job = self.backend.start_job(data, member.indices, member.seed)
        if job is None:
            handle = self.backend.fine_tune(data, member.indices, member.seed)
        else:
            self.store.save_handle(lo, PENDING + job)  # recorded before waiting: a kill now loses nothing
            handle = self.backend.wait_job(job)
        self.store.save_handle(lo, handle)
        return handle

    def _losses(self, handle: str, data: Any, member: int) -> Tensor:
        row = torch.as_tensor(self.backend.losses(handle, data), dtype=torch.float64)
        if row.shape != (len(data),) or not torch.isfinite(row).all():
            raise DunegrassError(
                f"the back end returned bad losses for member {member} (shape {tuple(row.shape)}, or NaN/inf); "
                "it must return one finite −log p(target | prompt) per example"
            )
        return row

    def _query_signals(self, queries: Any) -> Tensor:
        q = _dataset(queries)
        qstore = self.store.query_store(data_fingerprint(q), len(q))
        for index in qstore.missing():
            qstore.write(index, {"signal": self._losses(self.store.load_handle(index), q, index)[None].numpy()})
        return torch.from_numpy(qstore.load("signal"))
