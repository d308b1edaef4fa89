"""Scoring from stored signals, shared by Daunce, BlackBoxDaunce and BayesianInfluence: covariance across models.

Needs ``store`` (a SignalStore), ``n_train``, ``num_models``, ``_query_signals(queries) -> [K, n_query]``
and ``_score_device``. Scores stream chunk by chunk of training examples into a dense or top-k sink;
under torch.distributed each rank scores its contiguous share of the queries and every rank returns
them all.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import distributed
from ..errors import DunegrassError
from ..scores import Scores, TopScores, concat_scores, make_sink
from .daunce_objectives import chunk_columns, covariance_into, variance_with_stderr


class CovarianceScoring:
    # None: the K models are i.i.d.; a number: they are that many runs of correlated draws (SGLD chains),
    # and standard errors are batch means over the runs.
    _stderr_blocks: int | None = None

    @property
    def _normalize(self) -> bool:
        """Correlations instead of covariances (``normalize=True``)."""
        return bool(getattr(getattr(self, "options", None), "normalize", False))

    def _require_complete(self) -> None:
        self._require_fit()
        if not self.store.complete:
            raise DunegrassError("the ensemble is incomplete; run fit(train, cache_dir=...) again to finish it")

    @property
    def _score_device(self) -> torch.device:
        return torch.device("cpu")

    def _meta(self) -> dict:
        return self.describe()

    def signals(self, queries: Any = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(A [K, n_train], B [K, n_query] or None)``: the members' signals (float64, on the host)."""
        self._require_complete()
        A = self.store.train_signals()
        return A, None if queries is None else self._query_signals(queries)

    def score(self, queries: Any, top_k: int | None = None) -> Scores | TopScores:
        """Covariance scores ``[n_query, n_train]`` (positive = proponent) with their standard errors; with
        ``top_k``, only each query's ``top_k`` largest and smallest (TopScores), without the dense matrix.
        Streamed chunk by chunk of training examples (memory per chunk: ``daunce_objectives.chunk_columns``)."""
        self._require_complete()
        B = self._query_signals(queries)
        lo, hi = distributed.my_rows(B.shape[1])
        mine = B[:, lo:hi]
        sink = make_sink(mine.shape[1], self.n_train, top_k, with_stderr=True)
        per_chunk = mine.shape[1] * (1 + (self._stderr_blocks or 0))  # block estimates: blocks × the values
        chunks = self.store.train_chunks(chunk_columns(self.num_models, per_chunk))
        covariance_into(sink, chunks, mine, self._score_device, self._stderr_blocks, self._normalize)
        result = sink.result(self.method_name, self._meta())
        return concat_scores([result], gather=distributed.active(), device=self._score_device)

    def self_scores(self) -> Scores:
        """``Scores [1, n_train]``: Cov(s_i, s_i), the variance of each training example's signal across the
        members, with its standard error (the covariance's, with both sides the same signal). Not normalised
        with ``normalize=True`` (a signal's correlation with itself is 1)."""
        self._require_complete()
        columns = chunk_columns(self.num_models, self._stderr_blocks or 0)
        pairs = [variance_with_stderr(a, self._stderr_blocks) for _, a in self.store.train_chunks(columns)]
        return self._self_scores(torch.cat([v for v, _ in pairs]), torch.cat([e for _, e in pairs]))
