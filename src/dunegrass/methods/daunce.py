"""Daunce: attribution from the covariance of per-example signals across perturbed models (algorithms.md §3).

Start from θ₀; for k = 1…K fine-tune a copy on a random subset D_k (ratio r) with a perturbed
objective (``if``, ``efim``) or plainly (``blackbox``); evaluate every member's per-example signal
(loss, or minus the margin) on the training set, A ``[K, n_train]``, and on the queries, B
``[K, n_query]``. Scores are the covariance across members, S = B_cᵀ A_c / (K − 1), shape
``[n_query, n_train]``; **positive = proponent**. Each score is a sample covariance of K i.i.d.
draws, so it comes with a standard error (``Scores.stderr``) that shrinks as 1/√K.

The perturbation: member k draws D_k and one ξ_{k,i} ~ U(0, 1) per training example from its own
seed streams (so member k is the same for any K and any back end), ε = 2ξ − 1, fixed for all of
its epochs. θ₀'s outputs, output gradients and losses are recomputed for each training batch (one
more forward per step), never stored for all n examples.

Where things live: members train and are evaluated on the model's device; each member's signals go
to the host once (a ``[n]`` row) and into the store as it finishes (``cache_dir``), so a killed fit
resumes at the next member; member weights are written to disk (``keep_members``; a private
temporary directory without ``cache_dir``) so that queries unknown at fit time can be scored later
without retraining. Memory: RAM and device hold one member (one vmapped group) and one batch's
outputs at a time; scoring streams chunks of training examples (``daunce_objectives.CHUNK_BYTES``),
so only the result — dense, or each query's top-k — grows with n_train.

Under ``torchrun`` (torch.distributed) rank r trains the member groups g with g % world_size == r
into the shared ``cache_dir``, waits for the others, then reads every member's signals: the same
scores as one process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import distributed
from ..data import as_data, iterate_batches, to_device
from ..errors import DunegrassError, NonFiniteError
from ..fingerprint import data_fingerprint, model_fingerprint
from ..options import DaunceOptions, build, deprecated
from ..store.signals import SignalStore
from ..task import Task
from .base import Attributor, eval_mode
from .covariance_scoring import CovarianceScoring
from .daunce_backends import EnsembleBackend, FinetuneBackend, NewtonBackend
from .daunce_objectives import (
    check_outputs,
    check_theta0,
    draw_eps,
    draw_members,
    objective_terms,
    signal_fn,
)

AUTO_ENSEMBLE_MAX_PARAMS = 2_000_000  # above this, vmapping many copies costs too much memory
# Settings that do not change any member's signals: left out of the cache's key.
RESULT_NEUTRAL = (
    "num_models", "max_members", "keep_members", "checkpoint_every", "eval_batch_size", "prefix_cache_mib", "normalize"
)  # fmt: skip
EVAL_BYTES = 512 << 20  # outputs of one evaluation pass (all vmapped members), when eval_batch_size is not set
# Shortcuts for single fields of the members' recipe (DaunceOptions.train), and names of earlier releases.
RECIPE_SHORTCUTS = ("optimizer", "lr", "steps", "train_batch_size")
LEGACY = {"signal": "train_signal= and query_signal=", "batch_size": "train_batch_size=", "config": "train="}


class Daunce(CovarianceScoring, Attributor):
    """Daunce with K perturbed members; settings in ``DaunceOptions`` (``options=``, or any of its fields
    as a keyword: ``num_models``, ``variant``, ``subsample_ratio``, ``rho``, ``gamma``, ``train_signal``,
    ``query_signal``, ``train``, ``trainer``, ``lora`` (a LoraConfig or True), ``l2``, ``max_members``,
    ``keep_members``, ``checkpoint_every``, ``eval_batch_size``, ``seed``). ``optimizer``, ``lr``,
    ``steps`` and ``train_batch_size`` set single fields of the members' recipe. Presets:
    ``DaunceOptions.preset("llm")`` (LoRA, the authors' recipe), ``"low_memory"``.
    """

    method_name = "daunce"

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        *,
        options: DaunceOptions | None = None,
        progress: bool | None = None,
        **overrides: Any,
    ):
        super().__init__(model, task, progress)
        for old, new in LEGACY.items():
            if old in overrides:
                deprecated(f"{old}=", new, "Daunce")
        if "signal" in overrides:
            signal = overrides.pop("signal")
            overrides.setdefault("train_signal", signal)
            overrides.setdefault("query_signal", signal)
        if "config" in overrides:
            overrides["train"] = overrides.pop("config")
        if "batch_size" in overrides:
            overrides["train_batch_size"] = overrides.pop("batch_size")
        recipe = {k: overrides.pop(k) for k in RECIPE_SHORTCUTS if overrides.get(k) is not None}
        for k in RECIPE_SHORTCUTS:
            overrides.pop(k, None)
        opts = build(DaunceOptions, options, overrides, "Daunce")
        if recipe:
            fields = {("batch_size" if k == "train_batch_size" else k): v for k, v in recipe.items()}
            if "steps" in fields:
                fields["epochs"] = None
            opts = replace(opts, train=replace(opts.recipe, **fields))
        self.options = opts
        self.signal_fns = {side: signal_fn(task, getattr(opts, f"{side}_signal")) for side in ("train", "query")}
        self.store: SignalStore | None = None

    @property
    def num_models(self) -> int:
        return self.options.num_models

    # ---- configuration
    def _resolve_trainer(self, data: Any) -> str:
        if self.options.trainer != "auto":
            return self.options.trainer
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        from ..data import TensorData

        small = isinstance(as_data(data), TensorData) and n_params <= AUTO_ENSEMBLE_MAX_PARAMS
        return "ensemble" if small and self.options.lora is None else "finetune"

    def describe(self) -> dict:
        return {"method": self.method_name, **self.options.to_dict()}

    def _eval_batch(self) -> int:
        """Examples per evaluation pass: ``eval_batch_size``, else 512 for the vmapped back ends and the training
        batch size member by member, capped so that one pass's outputs (for a language model batch × tokens
        × vocabulary, for every vmapped member) stay within EVAL_BYTES."""
        if self.options.eval_batch_size is not None:
            return self.options.eval_batch_size
        vmapped = self.trainer_used != "finetune"
        base = 512 if vmapped else self.options.recipe.batch_size
        members = min(self.options.max_members, self.num_models) if vmapped else 1
        return max(1, min(base, EVAL_BYTES // (4 * self._output_size * members)))

    def _measure_outputs(self, data: Any) -> None:
        """The model's outputs per example (numbers), from one example: what an evaluation batch costs."""
        _, one = next(iterate_batches(data, 1))
        with torch.no_grad(), eval_mode(self.model):
            self._output_size = max(1, check_outputs(self.task, self.model, to_device(one, self._device))[0].numel())

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _make_backend(self, trainer: str, cache_dir: str | None):
        o = self.options
        terms = objective_terms(self.task, o.variant, o.rho, o.gamma)
        anchored = o.variant != "blackbox"
        if trainer == "newton":
            return NewtonBackend(self.model, self.task, terms, o.l2, anchored=anchored)
        if trainer == "ensemble":
            return EnsembleBackend(self.model, self.task, o.recipe, terms, anchored, self.progress)
        ckpt = None if cache_dir is None else os.path.join(cache_dir, "partial")
        return FinetuneBackend(
            self.model,
            self.task,
            o.recipe,
            terms,
            anchored,
            o.lora,
            ckpt,
            o.checkpoint_every,
            self.progress,
            prefix_bytes=o.prefix_cache_mib << 20,
        )

    @contextmanager
    def _session(self, trainer: str, cache_dir: str | None) -> Iterator[Any]:
        """A back end on the model in eval mode; afterwards the model is exactly as the caller left it
        (θ₀, no adapters, each submodule's train/eval mode, buffers untouched)."""
        with eval_mode(self.model):
            backend = self._make_backend(trainer, cache_dir)
            try:
                yield backend
            finally:
                backend.close()

    # ---- fit
    def fit(self, train: Any, *args: Any, queries: Any = None, cache_dir: str | os.PathLike | None = None) -> Daunce:
        """Train the K members (or resume), storing their signals on ``train`` (and ``queries``).

        A cache made with fewer members grows: only the new members are trained (member k does not depend
        on K). Under torch.distributed each rank trains its share of the member groups into the shared
        ``cache_dir`` (required there) and returns once every rank has finished.
        """
        queries, cache_dir = self._fit_args(args, queries, cache_dir, ("queries", "cache_dir"))
        data = as_data(train)
        cache = self._cache_dir(cache_dir)
        distributed.require_shared_cache(cache)
        trainer = self._resolve_trainer(data)
        # groups aligned to max_members whatever K is, so that K can grow
        group = 1 if trainer == "finetune" else self.options.max_members
        config = {
            **{k: v for k, v in self.describe().items() if k not in RESULT_NEUTRAL},
            "trainer": trainer,
            "task": self.task.config(),
            "data": data_fingerprint(data),
            "weights": model_fingerprint(self.model),
            "trainable": sorted(n for n, p in self.model.named_parameters() if p.requires_grad),
        }
        store = SignalStore(cache, config, self.num_models, len(data), group)
        self.train_data, self.n_train, self.store, self.trainer_used = data, len(data), store, trainer
        self._measure_outputs(data)
        query_store = None if queries is None else self._query_store(queries)
        mine = self._mine(store.missing_groups())
        if mine or (query_store is not None and self._mine(store.runs(query_store.missing()))):
            with self._session(trainer, cache) as backend:
                backend.check_data(data)
                if mine and self.options.variant != "blackbox":
                    # Member by member the session's model is still θ₀ here (fresh adapters have B = 0);
                    # checking through it also fills its frozen-prefix cache with every training example.
                    net = getattr(backend, "net", self.model)
                    check_theta0(net, self.task, data, self._eval_batch(), self._device)
                if mine:
                    self._train_groups(backend, data, mine, queries, query_store)
                if query_store is not None:
                    self._fill_queries(backend, query_store, queries)
        distributed.barrier()  # every rank's members are stored before any rank reads them
        return self

    def _mine(self, groups: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """This rank's share of member ranges: aligned group g goes to rank g % world_size."""
        return [(lo, hi) for lo, hi in groups if distributed.my_shards([lo // self.store.group_size])]

    def _train_groups(self, backend, data: Any, groups: list[tuple[int, int]], queries: Any, query_store) -> None:
        o = self.options
        members = draw_members(len(data), self.num_models, o.subsample_ratio, o.seed)
        for lo, hi in tqdm(groups, desc="daunce: members", disable=not self.progress, unit="group"):
            eps = None if o.variant == "blackbox" else draw_eps(len(data), range(lo, hi), o.seed)
            states = backend.train(data, members[lo:hi], eps)
            rows = self._evaluate(backend, states, data, lo, "train")
            qrows = {}
            if query_store is not None:  # (a member whose query row exists is rewritten with the same values)
                qrows["q"] = (query_store, self._evaluate(backend, states, queries, lo, "query"))
            self.store.write_group(lo, rows, qrows, states if o.keep_members else None)
            del states  # one group's members at a time

    def _evaluate(self, backend, states, data, lo: int, side: str) -> Tensor:
        rows = backend.evaluate(states, data, self.signal_fns[side], self._eval_batch())
        bad = ~torch.isfinite(rows).all(dim=1)
        if bad.any():
            k = lo + int(bad.nonzero()[0, 0])
            efim = self.options.variant == "efim"
            hint = " (the efim objective diverges at step sizes that suit if: lower lr)" if efim else ""
            raise NonFiniteError(
                f"member {k} has NaN/inf signals: its fine-tuning diverged{hint}; lower lr or steps, or rho"
            )
        return rows

    def _query_store(self, queries: Any):
        q = as_data(queries)
        store = self.store.query_store(data_fingerprint(q), len(q))
        if store.missing():  # new queries: a NaN in one of them is its own fault, not a member's
            with eval_mode(self.model):
                check_theta0(
                    self.model, self.task, q, self._eval_batch(), self._device, self.signal_fns["query"], "query"
                )
        return store

    def _fill_queries(self, backend, query_store, queries: Any) -> None:
        """Signals of already trained members on ``queries``, from their kept weights (this rank's groups)."""
        for lo, hi in self._mine(self.store.runs(query_store.missing())):
            if not all(self.store.has_weights(k) for k in range(lo, hi)):
                raise DunegrassError(
                    "these queries were not passed to fit and the members' weights were not kept "
                    "(keep_members=False); score the queries given to fit, or fit again into a new cache_dir "
                    "with fit(train, queries=...)"
                )
            states = [self.store.load_weights(k, self._device) for k in range(lo, hi)]
            rows = self._evaluate(backend, states, queries, lo, "query").numpy()
            for j, k in enumerate(range(lo, hi)):
                query_store.write(k, {"signal": rows[j : j + 1]})

    # ---- score (score, self_scores, signals: CovarianceScoring)
    def _query_signals(self, queries: Any) -> Tensor:
        """``B [K, n_query]`` float64, from the store or from the kept members (then stored)."""
        query_store = self._query_store(queries)
        if self._mine(self.store.runs(query_store.missing())):
            with self._session(self.trainer_used, None) as backend:
                self._fill_queries(backend, query_store, queries)
        distributed.barrier()  # the other ranks' groups
        return torch.from_numpy(query_store.load("signal"))

    @property
    def _score_device(self) -> torch.device:
        return self._device if self._device.type != "mps" else torch.device("cpu")  # MPS has no float64

    def _meta(self) -> dict:
        return {**self.describe(), "trainer": self.trainer_used}
