"""Daunce: attribution from the covariance of per-example signals across perturbed models (algorithms.md §3).

Start from θ₀; for k = 1…K fine-tune a copy on a random subset D_k (ratio r) with a perturbed
objective (``if``, ``efim``) or plainly (``blackbox``); evaluate every member's per-example signal
(loss, or minus the margin) on the training set, A ``[K, n_train]``, and on the queries, B
``[K, n_query]``. Scores are the covariance across members, S = B_cᵀ A_c / (K − 1), shape
``[n_query, n_train]``; **positive = proponent**. Each score is a sample covariance of K i.i.d.
draws, so it comes with a standard error (``Scores.stderr``) that shrinks as 1/√K.

The perturbation: member k draws D_k and one ξ_{k,i} ~ U(0, 1) per training example from its own
seed streams (so member k is the same for any K and any back end), ε = 2ξ − 1, fixed for all of
its epochs. θ₀'s outputs, output gradients and losses are computed once and shared by all members.

Signals are stored per member as members finish (``cache_dir``), so a killed fit resumes at the next
member; member weights are kept (``keep_members``) so that queries unknown at fit time can be
scored later without retraining.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data import as_data, to_device
from ..errors import DunegrassError, NonFiniteError
from ..fingerprint import data_fingerprint, state_fingerprint
from ..scores import Scores
from ..store.signals import SignalStore
from ..task import Task
from ..train import TrainConfig
from ..train.lora import LoraConfig
from .base import Attributor
from .daunce_backends import BACKENDS, EnsembleBackend, FinetuneBackend, NewtonBackend
from .daunce_objectives import (
    SIGNALS,
    VARIANTS,
    covariance_scores,
    draw_eps,
    draw_members,
    objective_terms,
    signal_fn,
    theta0_anchors,
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
        keep_members: keep each member's trained tensors (on disk with ``cache_dir``) to score new queries.
        checkpoint_every: with ``finetune`` and a ``cache_dir``, checkpoint a member every so many steps.
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
        eval_batch_size: int = 512,
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
        self._backend = None

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

    def _make_backend(self, trainer: str, cache_dir: str | None):
        terms = objective_terms(self.task, self.variant, self.rho, self.gamma)
        if trainer == "newton":
            return NewtonBackend(self.model, self.task, terms, self.l2, anchored=self.variant != "blackbox")
        if trainer == "ensemble":
            return EnsembleBackend(self.model, self.task, self.config, terms, self.progress)
        ckpt = None if cache_dir is None else os.path.join(cache_dir, "partial")
        return FinetuneBackend(
            self.model, self.task, self.config, terms, self.lora, ckpt, self.checkpoint_every, self.progress
        )

    # ---- fit
    def fit(self, train: Any, queries: Any = None, cache_dir: str | os.PathLike | None = None) -> Daunce:
        """Train the K members (or resume), storing their signals on ``train`` (and ``queries``)."""
        data = as_data(train)
        trainer = self._resolve_trainer(data)
        cache = None if cache_dir is None else os.fspath(cache_dir)
        group = 1 if trainer == "finetune" else min(self.max_members, self.num_models)
        config = {
            **self.describe(),
            "trainer": trainer,
            "task": self.task.config(),
            "data": data_fingerprint(data),
            "weights": state_fingerprint(self.model.state_dict()),
        }
        store = SignalStore(cache, config, self.num_models, len(data), group)
        self.train_data, self.n_train, self.store, self.trainer_used = data, len(data), store, trainer
        was_training = self.model.training
        # Eval mode: no dropout, so the perturbation and the batch order are a member's only randomness.
        self.model.eval()
        backend = self._make_backend(trainer, cache)
        try:
            backend.check_data(data)
            missing = store.missing_groups()
            query_store = None if queries is None else self._query_store(queries)
            if missing:
                shared = self._anchors(data)
                members = draw_members(len(data), self.num_models, self.ratio, self.seed)
                bar = tqdm(total=len(missing), desc="daunce: members", disable=not self.progress, unit="group")
                for lo, hi in missing:
                    eps = None if self.variant == "blackbox" else draw_eps(len(data), range(lo, hi), self.seed)
                    states = backend.train(data, members[lo:hi], shared, eps)
                    rows = self._evaluate(backend, states, data, lo)
                    qrows = {}
                    if query_store is not None and (lo // store.group_size) in query_store.missing():
                        qrows["q"] = (query_store, self._evaluate(backend, states, queries, lo))
                    store.write_group(lo, rows, qrows, states if self.keep_members else None)
                    bar.update(1)
                bar.close()
            self._backend = backend
            if query_store is not None:
                self._fill_queries(query_store, queries)
        finally:
            self._close(backend)
            self.model.train(was_training)
        return self

    def _close(self, backend) -> None:
        backend.close()
        self._backend = None

    def _anchors(self, data: Any) -> dict[str, Tensor]:
        if self.variant == "blackbox":
            return {}
        device = next(self.model.parameters()).device
        anchors = theta0_anchors(self.model, self.task, data, self.eval_batch_size, device)
        return {k: to_device(v, "cpu") for k, v in anchors.items()}

    def _evaluate(self, backend, states, data, lo: int) -> Tensor:
        rows = backend.evaluate(states, data, self.signal_fn, self.eval_batch_size)
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

    def _fill_queries(self, query_store, queries: Any) -> None:
        """Signals of already trained members on ``queries``, from their kept weights."""
        for index in query_store.missing():
            lo, hi = query_store.rows(index)
            if not all(self.store.has_weights(k) for k in range(lo, hi)):
                raise DunegrassError(
                    "these queries were not passed to fit and the members' weights were not kept; "
                    "pass the queries to fit(train, queries=...) or use keep_members=True"
                )
            states = [self.store.load_weights(k) for k in range(lo, hi)]
            query_store.write(index, {"signal": self._evaluate(self._backend, states, queries, lo).numpy()})

    # ---- score
    def signals(self, queries: Any = None) -> tuple[Tensor, Tensor | None]:
        """``(A [K, n_train], B [K, n_query] or None)``: the members' signals (float64)."""
        self._require_fit()
        if not self.store.complete:
            raise DunegrassError("the ensemble is incomplete; run fit(train, cache_dir=...) again to finish it")
        A = self.store.train_signals()
        if queries is None:
            return A, None
        query_store = self._query_store(queries)
        if not query_store.complete:
            self._with_backend(lambda: self._fill_queries(query_store, queries))
        return A, torch.from_numpy(query_store.load("signal"))

    def _with_backend(self, fn) -> None:
        was_training = self.model.training
        self.model.eval()
        backend = self._make_backend(self.trainer_used, None)
        self._backend = backend
        try:
            fn()
        finally:
            self._close(backend)
            self.model.train(was_training)

    def score(self, queries: Any) -> Scores:
        """Covariance scores ``[n_query, n_train]`` (positive = proponent) with their standard errors."""
        A, B = self.signals(queries)
        values, stderr = covariance_scores(A, B)
        return Scores(
            values, stderr=stderr, method=self.method_name, meta={**self.describe(), "trainer": self.trainer_used}
        )

    def self_scores(self) -> Tensor:
        """``[n_train]``: Cov(s_i, s_i) = the variance of each training example's signal across members."""
        A, _ = self.signals()
        return A.to(torch.float64).var(0).to(torch.float32)
