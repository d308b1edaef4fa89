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
from ..data import as_data
from ..errors import DunegrassError, NonFiniteError
from ..fingerprint import data_fingerprint, model_fingerprint
from ..scores import Scores, TopScores, make_sink
from ..store.signals import SignalStore
from ..task import Task
from ..train import TrainConfig
from ..train.lora import LoraConfig
from .base import Attributor, eval_mode
from .daunce_backends import BACKENDS, EnsembleBackend, FinetuneBackend, NewtonBackend
from .daunce_objectives import (
    SIGNALS,
    VARIANTS,
    check_theta0,
    chunk_columns,
    covariance_into,
    draw_eps,
    draw_members,
    objective_terms,
    signal_fn,
)

# Short Adam runs with cosine decay (algorithms.md §3); lr 1e-3 and 50 steps won the lr × steps sweep
# on the digits MLP (benchmarks/daunce_lds.py): the estimator wants many cheap members.
DEFAULT_CONFIG = TrainConfig(optimizer="adam", lr=1e-3, steps=50, epochs=None, batch_size=64, schedule="cosine")
# The authors' LLM recipe: LoRA on the MLP projections, AdamW, cosine with 3 % warm-up, one epoch.
LORA_CONFIG = TrainConfig(optimizer="adamw", lr=3e-4, epochs=1.0, batch_size=16, schedule="cosine", warmup=0.03)
AUTO_ENSEMBLE_MAX_PARAMS = 2_000_000  # above this, vmapping many copies costs too much memory


class Daunce(Attributor):
    """Daunce with K perturbed members.

    Args:
        num_models: K ≥ 2; the Monte-Carlo noise of every score shrinks as 1/√K.
        variant: ``"if"`` (default), ``"efim"`` or ``"blackbox"`` (plain fine-tuning on D_k).
        subsample_ratio: r in (0, 1], |D_k| = round(r · n).
        rho, gamma: the perturbation scale ρ and loss weight γ of the objectives (default 1).
        signal: ``"loss"``, ``"margin"`` (classification; minus the margin) or ``"measurement"``
            (``task.query_loss``), evaluated on both sides.
        config: the fine-tuning recipe (TrainConfig); ``optimizer``/``lr``/``steps``/``batch_size``
            override single fields. Default: Adam lr 1e-3, 50 steps, batch 64, cosine decay; with
            LoRA, AdamW lr 3e-4, one epoch, batch 16, cosine with 3 % warm-up.
        trainer: ``"auto"`` (vmapped ensemble for in-memory data and small models, else member by
            member), ``"ensemble"``, ``"finetune"`` or ``"newton"`` (exact minimisation; convex
            models whose outputs are linear in the parameters, with ``l2``).
        lora: a LoraConfig, or True for the default (rank 64, α 16, MLP projections); finetune only.
        l2: the L2 coefficient for ``trainer="newton"`` (see NewtonBackend).
        max_members: members trained together by the vmapped back ends (memory); part of the cache layout.
        keep_members: write each member's trained tensors to disk (under ``cache_dir``, else a private
            temporary directory removed with the attributor) to score new queries without retraining.
        checkpoint_every: with ``finetune`` and a ``cache_dir``, checkpoint a member every so many steps.
        eval_batch_size: examples per forward pass when members are evaluated. Default: 512 for the
            vmapped back ends (small models), the training batch size member by member (a language
            model's logits are batch × tokens × vocabulary: 512 of them would not fit).
    """

    method_name = "daunce"

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        num_models: int = 32,
        variant: str = "if",
        subsample_ratio: float = 0.3,
        rho: float = 1.0,
        gamma: float = 1.0,
        signal: str = "loss",
        config: TrainConfig | None = None,
        optimizer: str | None = None,
        lr: float | None = None,
        steps: int | None = None,
        batch_size: int | None = None,
        trainer: str = "auto",
        lora: LoraConfig | bool | None = None,
        l2: float = 0.0,
        max_members: int = 128,
        keep_members: bool = True,
        checkpoint_every: int = 0,
        eval_batch_size: int | None = None,
        seed: int = 0,
        progress: bool | None = None,
    ):
        super().__init__(model, task, progress)
        if not isinstance(num_models, int) or num_models < 2:
            raise DunegrassError(
                f"num_models must be an integer K ≥ 2 (a covariance needs two models), got {num_models}"
            )
        if variant not in VARIANTS:
            raise DunegrassError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if not 0 < subsample_ratio <= 1:
            raise DunegrassError(f"subsample_ratio must be in (0, 1], got {subsample_ratio}")
        if signal not in SIGNALS:
            raise DunegrassError(f"signal must be one of {SIGNALS}, got {signal!r}")
        if trainer not in ("auto", *BACKENDS):
            raise DunegrassError(f"trainer must be 'auto' or one of {BACKENDS}, got {trainer!r}")
        if not (rho > 0 and gamma > 0) or l2 < 0 or max_members < 1:
            raise DunegrassError("rho and gamma must be positive, l2 non-negative and max_members at least 1")
        self.lora = LoraConfig() if lora is True else (lora or None)
        if self.lora is not None and trainer in ("ensemble", "newton"):
            raise DunegrassError(f"LoRA trains member by member; use trainer='finetune' (not {trainer!r})")
        base = config or (LORA_CONFIG if self.lora is not None else DEFAULT_CONFIG)
        overrides = {"optimizer": optimizer, "lr": lr, "batch_size": batch_size}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if steps is not None:
            overrides.update(steps=steps, epochs=None)
        self.config = replace(base, **overrides)
        self.num_models, self.variant, self.ratio = num_models, variant, float(subsample_ratio)
        self.rho, self.gamma, self.signal, self.l2 = float(rho), float(gamma), signal, float(l2)
        self.trainer, self.max_members, self.keep_members = trainer, max_members, keep_members
        self.checkpoint_every, self.eval_batch_size, self.seed = checkpoint_every, eval_batch_size, seed
        self.signal_fn = signal_fn(task, signal)
        self.store: SignalStore | None = None

    # ---- configuration
    def _resolve_trainer(self, data: Any) -> str:
        if self.trainer != "auto":
            return self.trainer
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        from ..data import TensorData

        small = isinstance(as_data(data), TensorData) and n_params <= AUTO_ENSEMBLE_MAX_PARAMS
        return "ensemble" if small and self.lora is None else "finetune"

    def describe(self) -> dict:
        return {
            "method": self.method_name,
            "num_models": self.num_models,
            "variant": self.variant,
            "subsample_ratio": self.ratio,
            "rho": self.rho,
            "gamma": self.gamma,
            "signal": self.signal,
            "train_config": self.config.to_dict(),
            "trainer": self.trainer,
            "lora": None if self.lora is None else self.lora.to_dict(),
            "l2": self.l2,
            "seed": self.seed,
        }

    def _eval_batch(self) -> int:
        if self.eval_batch_size is not None:
            return self.eval_batch_size
        return self.config.batch_size if self.trainer_used == "finetune" else 512

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _make_backend(self, trainer: str, cache_dir: str | None):
        terms = objective_terms(self.task, self.variant, self.rho, self.gamma)
        anchored = self.variant != "blackbox"
        if trainer == "newton":
            return NewtonBackend(self.model, self.task, terms, self.l2, anchored=anchored)
        if trainer == "ensemble":
            return EnsembleBackend(self.model, self.task, self.config, terms, anchored, self.progress)
        ckpt = None if cache_dir is None else os.path.join(cache_dir, "partial")
        return FinetuneBackend(
            self.model, self.task, self.config, terms, anchored, self.lora, ckpt, self.checkpoint_every, self.progress
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
    def fit(self, train: Any, queries: Any = None, cache_dir: str | os.PathLike | None = None) -> Daunce:
        """Train the K members (or resume), storing their signals on ``train`` (and ``queries``).

        Under torch.distributed each rank trains its share of the member groups into the shared
        ``cache_dir`` (required there) and returns once every rank has finished.
        """
        data = as_data(train)
        cache = None if cache_dir is None else os.fspath(cache_dir)
        distributed.require_shared_cache(cache)
        trainer = self._resolve_trainer(data)
        group = 1 if trainer == "finetune" else min(self.max_members, self.num_models)
        config = {
            **self.describe(),
            "trainer": trainer,
            "task": self.task.config(),
            "data": data_fingerprint(data),
            "weights": model_fingerprint(self.model),
        }
        store = SignalStore(cache, config, self.num_models, len(data), group)
        self.train_data, self.n_train, self.store, self.trainer_used = data, len(data), store, trainer
        query_store = None if queries is None else self._query_store(queries)
        mine = [(lo, hi) for lo, hi in store.missing_groups() if distributed.my_shards([lo // group])]
        if mine and self.variant != "blackbox":
            with eval_mode(self.model):
                check_theta0(self.model, self.task, data, self._eval_batch(), self._device)
        if mine or (query_store is not None and distributed.my_shards(query_store.missing())):
            with self._session(trainer, cache) as backend:
                backend.check_data(data)
                if mine:
                    self._train_groups(backend, data, mine, queries, query_store)
                if query_store is not None:
                    self._fill_queries(backend, query_store, queries)
        distributed.barrier()  # every rank's members are stored before any rank reads them
        return self

    def _train_groups(self, backend, data: Any, groups: list[tuple[int, int]], queries: Any, query_store) -> None:
        members = draw_members(len(data), self.num_models, self.ratio, self.seed)
        for lo, hi in tqdm(groups, desc="daunce: members", disable=not self.progress, unit="group"):
            eps = None if self.variant == "blackbox" else draw_eps(len(data), range(lo, hi), self.seed)
            states = backend.train(data, members[lo:hi], eps)
            rows = self._evaluate(backend, states, data, lo)
            qrows = {}
            if query_store is not None and (lo // self.store.group_size) in query_store.missing():
                qrows["q"] = (query_store, self._evaluate(backend, states, queries, lo))
            self.store.write_group(lo, rows, qrows, states if self.keep_members else None)
            del states  # one group's members at a time

    def _evaluate(self, backend, states, data, lo: int) -> Tensor:
        rows = backend.evaluate(states, data, self.signal_fn, self._eval_batch())
        bad = ~torch.isfinite(rows).all(dim=1)
        if bad.any():
            k = lo + int(bad.nonzero()[0, 0])
            hint = (
                " (the efim objective diverges at step sizes that suit if: lower lr)" if self.variant == "efim" else ""
            )
            raise NonFiniteError(
                f"member {k} has NaN/inf signals: its fine-tuning diverged{hint}; lower lr or steps, or rho"
            )
        return rows

    def _query_store(self, queries: Any):
        q = as_data(queries)
        return self.store.query_store(data_fingerprint(q), len(q))

    def _fill_queries(self, backend, query_store, queries: Any) -> None:
        """Signals of already trained members on ``queries``, from their kept weights (this rank's groups)."""
        for index in distributed.my_shards(query_store.missing()):
            lo, hi = query_store.rows(index)
            if not all(self.store.has_weights(k) for k in range(lo, hi)):
                raise DunegrassError(
                    "these queries were not passed to fit and the members' weights were not kept; "
                    "pass the queries to fit(train, queries=...) or use keep_members=True"
                )
            states = [self.store.load_weights(k, self._device) for k in range(lo, hi)]
            query_store.write(index, {"signal": self._evaluate(backend, states, queries, lo).numpy()})

    # ---- score
    def _require_complete(self) -> None:
        self._require_fit()
        if not self.store.complete:
            raise DunegrassError("the ensemble is incomplete; run fit(train, cache_dir=...) again to finish it")

    def _query_signals(self, queries: Any) -> Tensor:
        """``B [K, n_query]`` float64, from the store or from the kept members (then stored)."""
        query_store = self._query_store(queries)
        if distributed.my_shards(query_store.missing()):
            with self._session(self.trainer_used, None) as backend:
                self._fill_queries(backend, query_store, queries)
        distributed.barrier()  # the other ranks' groups
        return torch.from_numpy(query_store.load("signal"))

    def signals(self, queries: Any = None) -> tuple[Tensor, Tensor | None]:
        """``(A [K, n_train], B [K, n_query] or None)``: the members' signals (float64, on the host)."""
        self._require_complete()
        A = self.store.train_signals()
        return A, None if queries is None else self._query_signals(queries)

    def score(self, queries: Any, top_k: int | None = None) -> Scores | TopScores:
        """Covariance scores ``[n_query, n_train]`` (positive = proponent) with their standard errors.

        ``top_k``: only each query's ``top_k`` largest and smallest scores (TopScores), without the
        dense matrix. Scored on the model's device chunk by chunk of training examples; memory per
        chunk is bounded (``daunce_objectives.chunk_columns``), whatever n_train is.
        """
        self._require_complete()
        B = self._query_signals(queries)
        sink = make_sink(B.shape[1], self.n_train, top_k, with_stderr=True)
        chunks = self.store.train_chunks(chunk_columns(self.num_models, B.shape[1]))
        device = self._device if self._device.type != "mps" else "cpu"  # MPS has no float64
        covariance_into(sink, chunks, B, device)
        return sink.result(self.method_name, {**self.describe(), "trainer": self.trainer_used})

    def self_scores(self) -> Tensor:
        """``[n_train]``: Cov(s_i, s_i) = the variance of each training example's signal across members."""
        self._require_complete()
        chunks = self.store.train_chunks(chunk_columns(self.num_models, 0))
        return torch.cat([a.var(0).to(torch.float32) for _, a in chunks])
