"""Daunce through a fine-tuning service: K plain fine-tunes on random subsets, covariance of losses."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...data import as_data
from ...errors import DunegrassError
from ...fingerprint import data_fingerprint
from ...options import DaunceOptions
from ...store.signals import SignalStore
from ..base import Attributor
from ..covariance_scoring import CovarianceScoring
from ..daunce_objectives import draw_members
from .base import BlackBoxBackend, JobFailed
from .examples import PromptCompletions


def _dataset(data: Any) -> Any:
    """Prompt/completion dicts become a PromptCompletions dataset; anything else goes through as_data."""
    if isinstance(data, (list, tuple)) and data and all(isinstance(ex, Mapping) for ex in data):
        return PromptCompletions(list(data))
    return as_data(data)


STORED_COLUMNS = 65536  # training examples per read of the stored signals (K × this many numbers in memory)
PENDING = "pending-job:"  # prefix of a stored handle that is a started job's id, not yet a model
# On a paid service a fit (or a score) that starts more jobs, trains on more tokens or makes more scoring
# requests than this needs confirm=True.
CONFIRM_JOBS, CONFIRM_TOKENS, CONFIRM_REQUESTS = 2, 100_000, 5_000


class BlackBoxDaunce(CovarianceScoring, Attributor):
    """Daunce's ``blackbox`` variant with any BlackBoxBackend (algorithms.md §3): an Attributor like the
    others, whose model lives behind the back end.

    Member k is a fine-tune of the service's base model on D_k (ratio ``subsample_ratio``, drawn as
    by ``dg.Daunce`` with the same seed); its signals are the service's per-example losses. Scores
    ``[n_query, n_train]`` are the covariance across members, positive = proponent, with standard
    errors (``normalize=True``: correlations). Each member's handle and losses are stored as it finishes
    (``cache_dir``): a killed run resumes at the next member, and new queries are scored from the handles
    without fine-tuning — on a service; a member the back end no longer has (LocalBackend's live as long as
    its process) is fine-tuned again with its subset and seed, and must reproduce its stored training losses.

    On a paid back end ``fit`` prints what it will start (``plan``: jobs, approximate training tokens,
    scoring requests) and refuses more than CONFIRM_JOBS jobs or CONFIRM_TOKENS tokens without
    ``confirm=True``. Jobs carry the suffix ``dg-<run>-m<k>`` (the cache's config hash and the member).
    """

    method_name = "daunce-blackbox"

    def __init__(
        self,
        backend: BlackBoxBackend,
        *,
        num_models: int = 32,
        subsample_ratio: float = 0.3,
        seed: int = 0,
        normalize: bool = False,
        confirm: bool = False,
        progress: bool | None = None,
    ):
        if not isinstance(backend, BlackBoxBackend):
            raise DunegrassError(f"backend must be a BlackBoxBackend, got {type(backend).__name__}")
        super().__init__(progress=progress)
        # the same checks as dg.Daunce's (the members are drawn the same way)
        DaunceOptions(num_models=num_models, subsample_ratio=subsample_ratio, seed=seed)
        self.backend, self.num_models, self.ratio, self.seed = backend, num_models, float(subsample_ratio), seed
        self.confirm, self.normalize = bool(confirm), bool(normalize)
        self.store: SignalStore | None = None
        self._planned_queries: str | None = None
        self._rejected: set[int] = set()  # members fine-tuned again that did not reproduce their training losses

    def _watched_model(self) -> nn.Module | None:
        """A local back end's model (a service's is out of reach): its weights are checked as white-box ones."""
        model = getattr(self.backend, "model", None)
        return model if isinstance(model, nn.Module) else None

    def describe(self) -> dict:
        return {
            "method": self.method_name,
            "num_models": self.num_models,
            "subsample_ratio": self.ratio,
            "seed": self.seed,
            "normalize": self.normalize,
            "backend": self.backend.config(),
        }

    @property
    def _normalize(self) -> bool:
        return self.normalize

    def fit(
        self, train: Any, *args: Any, queries: Any = None, cache_dir: str | os.PathLike | None = None
    ) -> BlackBoxDaunce:
        """Fine-tune the K members (or resume); ``train``: tensors, a Dataset, or prompt/completion dicts."""
        queries, cache_dir = self._fit_args(args, queries, cache_dir, ("queries", "cache_dir"))
        data = _dataset(train)
        # K is not part of the key: member k is the same for any K, so a cache grows (each member is a paid job)
        # nor is normalize, which changes no member (scoring only)
        config = {k: v for k, v in self.describe().items() if k not in ("num_models", "normalize")}
        config["data"] = data_fingerprint(data)
        path = self._cache_dir(cache_dir)
        self.store = store = SignalStore(path, config, self.num_models, len(data), 1)
        self.train_data, self.n_train = data, len(data)
        members = draw_members(len(data), self.num_models, self.ratio, self.seed)
        todo = [lo for lo, _ in store.missing_groups()]
        self._approve(data, queries, members, todo, [lo for lo in todo if not store.has_handle(lo)])
        for lo in tqdm(todo, desc="daunce: fine-tunes", disable=not self.progress):
            handle = store.load_handle(lo) if store.has_handle(lo) else None
            if handle is not None and handle.startswith(PENDING):  # a job started before a kill: wait for it
                handle = self._wait(handle[len(PENDING) :], lo)
            # A member fine-tuned before a kill whose losses were not stored yet is reused when the back end
            # still has it (a service does; LocalBackend's members died with the process: train it again).
            if handle is None or not self.backend.has_model(handle):
                handle = self._fine_tune(data, members[lo], lo)
            store.write_group(lo, self._losses(handle, data, lo)[None])
        if queries is not None:
            self._planned_queries = data_fingerprint(_dataset(queries))  # its cost was in the fit's plan
            self.signals(queries)
        return self

    def plan(self, train: Any, queries: Any = None) -> dict:
        """What a fit from scratch costs: fine-tuning jobs, approximate training tokens, scoring requests."""
        data = _dataset(train)
        members = draw_members(len(data), self.num_models, self.ratio, self.seed)
        everything = list(range(self.num_models))
        return self._plan(data, None if queries is None else _dataset(queries), members, everything, everything)

    def _plan(self, data: Any, queries: Any, members: list, scored: list[int], jobs: list[int]) -> dict:
        tokens = [self.backend.approx_tokens(data, members[k].indices) for k in jobs]
        requests = len(scored) * self.backend.requests(len(data))
        if queries is not None:
            requests += self.num_models * self.backend.requests(len(queries))
        return {
            "jobs": len(jobs),
            "training_examples": sum(len(members[k].indices) for k in jobs),
            "training_tokens_approx": None if None in tokens else sum(tokens),
            "scoring_requests": requests,
            "paid": self.backend.paid,
        }

    def _approve(self, data: Any, queries: Any, members: list, todo: list[int], jobs: list[int]) -> None:
        """Check the examples, print the plan on a paid service, and stop above the threshold unless confirmed."""
        self.backend.check(data)
        if queries is not None:
            queries = _dataset(queries)
            self.backend.check(queries)
        if self.backend.paid and (todo or queries is not None):
            self._confirm(self._plan(data, queries, members, todo, jobs), "fit")

    def _confirm(self, plan: dict, what: str) -> None:
        tokens = plan["training_tokens_approx"]
        said = (
            f"{plan['jobs']} fine-tuning jobs on {plan['training_examples']} examples"
            + ("" if tokens is None else f" (about {tokens:,} training tokens)")
            + f" and {plan['scoring_requests']:,} scoring requests"
        )
        print(f"dunegrass: this {what} starts {said}", file=sys.stderr)
        over = plan["jobs"] > CONFIRM_JOBS or (tokens or 0) > CONFIRM_TOKENS
        if not self.confirm and (over or plan["scoring_requests"] > CONFIRM_REQUESTS):
            raise DunegrassError(
                f"this {what} would start {said} on a paid service; check the cost, then pass confirm=True to "
                "BlackBoxDaunce (on the command line: --yes; its plan(train, queries) method returns these figures)"
            )

    def _fine_tune(self, data: Any, member, lo: int) -> str:
        job = self.backend.start_job(data, member.indices, member.seed, name=f"dg-{self.store.hash[:8]}-m{lo}")
        if job is None:
            handle = self.backend.fine_tune(data, member.indices, member.seed)
        else:
            self.store.save_handle(lo, PENDING + job)  # recorded before waiting: a kill now loses nothing
            return self._wait(job, lo)
        self.store.save_handle(lo, handle)
        return handle

    def _wait(self, job: str, lo: int) -> str:
        try:
            handle = self.backend.wait_job(job)
        except JobFailed:
            self.store.forget_handle(lo)  # the next fit starts this member again (and plans it as a job)
            raise
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
        self.backend.check(q)
        fingerprint = data_fingerprint(q)
        qstore = self.store.query_store(fingerprint, len(q))
        missing = list(qstore.missing())
        if self.backend.paid and missing and fingerprint != self._planned_queries:
            requests = len(missing) * self.backend.requests(len(q))
            plan = {"jobs": 0, "training_examples": 0, "training_tokens_approx": None, "scoring_requests": requests}
            self._confirm(plan, "score")
        handles = {index: self.store.load_handle(index) for index in missing}
        lost = [i for i, handle in handles.items() if i in self._rejected or not self.backend.has_model(handle)]
        if lost and self.backend.paid:
            members = draw_members(self.n_train, self.num_models, self.ratio, self.seed)
            size = sum(len(members[k].indices) for k in lost)
            plan = {"jobs": len(lost), "training_examples": size, "training_tokens_approx": None}
            requests = len(lost) * (self.backend.requests(self.n_train) + self.backend.requests(len(q)))
            self._confirm({**plan, "scoring_requests": requests}, "score")
        # the lost members' stored training rows [len(lost), n_train], read a few columns of all K at a time
        rows = [chunk[lost] for _, chunk in self.store.train_chunks(STORED_COLUMNS)] if lost else []
        stored = dict(zip(lost, torch.cat(rows, dim=1))) if lost else {}
        for index in missing:
            handle = handles[index]
            if index in lost:
                handle = self._fine_tune_again(index, stored[index])
            qstore.write(index, {"signal": self._losses(handle, q, index)[None].numpy()})
        return torch.from_numpy(qstore.load("signal"))

    def _fine_tune_again(self, index: int, stored: Tensor) -> str:
        """Member ``index`` fine-tuned again, for a back end that no longer has it (LocalBackend's members live
        as long as its process): the same subset and seed, kept only if it reproduces the training losses
        ``stored`` for it, so that new queries are scored against the members the training signals came from."""
        member = draw_members(self.n_train, self.num_models, self.ratio, self.seed)[index]
        handle = self._fine_tune(self.train_data, member, index)
        again = self._losses(handle, self.train_data, index)
        if not torch.allclose(again, stored, rtol=1e-5, atol=1e-6):
            self._rejected.add(index)  # the stand-in is not the member (its handle may be the old name): never use it
            worst = float((again - stored).abs().max())
            raise DunegrassError(
                f"member {index} is gone from the back end ({type(self.backend).__name__}), and fine-tuned again it "
                f"does not reproduce its stored training losses (largest difference {worst:.3g}), so new queries "
                "cannot be scored against this cache's members; fit into a new cache_dir"
            )
        return handle
