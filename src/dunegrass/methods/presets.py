"""Presets of the gradient engine: TRAK, TracIn and exact influence."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DunegrassError
from ..influence.exact import damped_cholesky, damped_hessian
from ..options import choice, deprecated, positive_int
from ..task import ClassificationTask, Task
from .featurize import CompressorSpec, default_k, load_weights
from .gradient import GradientInfluence


class _LogOddsOf(Task):
    """A classification task as the user wrote it (outputs, labels, batch checks) whose measurement is the
    log-odds of the correct class, TRAK's, whatever measurement the task itself names."""

    measurement_higher_is_better = True

    def __init__(self, task: ClassificationTask):
        self.task = task

    def outputs(self, model: nn.Module, batch: Any) -> Tensor:
        return self.task.outputs(model, batch)

    def loss(self, outputs: Tensor, batch: Any) -> Tensor:
        return self.task.loss(outputs, batch)

    def measurement(self, outputs: Tensor, batch: Any) -> Tensor:
        return self.task.logodds(outputs, batch)

    def probability_correct(self, outputs: Tensor, batch: Any) -> Tensor:
        return self.task.probability_correct(outputs, batch)

    def batch_size(self, batch: Any) -> int:
        return self.task.batch_size(batch)

    def check_batch(self, batch: Any, output_shape: torch.Size) -> None:
        self.task.check_batch(batch, output_shape)

    def config(self) -> dict:  # the task's own, measuring the log-odds (a plain task's is as it always was)
        return {**self.task.config(), "measurement_name": "logodds", "measurement_higher_is_better": True}


class TRAK(GradientInfluence):
    """TRAK (Park et al. 2023; algorithms.md §1.2) for classification.

    Features: projected ∇ of the log-odds of the correct class (Gaussian JL to ``k``), per checkpoint
    with its own projection seed. τ = Q ⊙ mean_m φ_{z,m}ᵀ (Φ_mᵀΦ_m/n + λI)⁻¹ φ_{i,m}, Q_i = 1 − p_i
    averaged over checkpoints. Pass several independently trained ``checkpoints`` for the usual
    ensemble. ``compressor`` (a spec or factory, as GradientInfluence takes) replaces ``projector:k``.
    ``k`` defaults to 2048, or the number of parameters when that is smaller (said once).
    """

    method_name = "trak"

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        *,
        k: int | None = None,
        projector: str = "gaussian",
        compressor: CompressorSpec = None,
        **kwargs: Any,
    ):
        if not isinstance(task, ClassificationTask):
            raise DunegrassError(
                "TRAK needs a ClassificationTask (it explains the log-odds of the correct class); "
                f"got {type(task).__name__}. Use dg.GradientInfluence for other tasks."
            )
        for side in ("train_signal", "query_signal"):
            if kwargs.pop(side, "measurement") != "measurement":
                raise DunegrassError(f"TRAK differentiates the log-odds on both sides; {side} cannot be changed")
        self.base_task = task
        if compressor is None:
            k = default_k(model, kwargs.get("params"), 2048, "TRAK") if k is None else positive_int(k, "k")
            compressor = f"{projector}:{k}"
        logodds = _LogOddsOf(task)  # the user's task (its outputs, its batches), measuring the log-odds
        super().__init__(
            model, logodds, compressor=compressor, train_signal="measurement", query_signal="measurement", **kwargs
        )

    def _extra_widths(self) -> dict[str, int]:
        return {"q": 1}

    def _extra_arrays(self, batch) -> dict[str, Tensor]:
        with torch.no_grad():
            out = self.task.outputs(self.model, batch)
            q = 1.0 - self.task.probability_correct(out, batch)
        return {"q": q.to(torch.float32)[:, None]}

    def q_weights(self) -> Tensor:
        """``[n_train]`` (host): 1 − p(correct) averaged over checkpoints (read once, only that column)."""
        self._require_fit()
        if getattr(self, "_q", None) is None or self._q[0] is not self.stores:
            qs = [torch.cat([torch.from_numpy(a[:, 0]) for _, a in store.columns(0, 1, "q")]) for store in self.stores]
            self._q = (self.stores, torch.stack(qs).mean(0))
        return self._q[1]

    def _column_scale(self) -> Tensor:
        return self.q_weights()


class TracIn(GradientInfluence):
    """TracIn / gradient dot product: Σ_m η_m g_{z,m}ᵀ g_{i,m} (optionally compressed, no preconditioner).

    ``checkpoint_weights`` (η_m, e.g. the learning rates) weight the checkpoints (default: equal weights
    summing to one).
    """

    method_name = "tracin"

    def __init__(self, model: nn.Module, task: Task, compressor: CompressorSpec = "identity", **kwargs: Any):
        if "learning_rates" in kwargs:
            deprecated("learning_rates=", "checkpoint_weights=", "TracIn")
            kwargs["checkpoint_weights"] = kwargs.pop("learning_rates")
        if kwargs.pop("damping", None) is not None:
            raise DunegrassError("TracIn takes no damping: it is the plain dot product (use GradientInfluence)")
        super().__init__(model, task, compressor=compressor, damping=None, **kwargs)


class _HessianSolver:
    """Preconditioner interface over a full damped Hessian (exact influence), factorised once, on its device."""

    def __init__(self, hessian: Tensor, damping: float):
        self.chol = damped_cholesky(hessian, damping)

    def solve(self, features: Tensor) -> Tensor:
        rhs = features.to(self.chol.device, torch.float64).T
        return torch.cholesky_solve(rhs, self.chol).T.to(features.device, torch.float32)

    def self_influence(self, store) -> Tensor:
        out = torch.empty(store.n, dtype=torch.float32, device=self.chol.device)
        for start, chunk in store.iter_shards():
            f = torch.from_numpy(chunk).to(self.chol.device, torch.float32)
            out[start : start + f.shape[0]] = (self.solve(f) * f).sum(1)
        return out


class ExactInfluence(GradientInfluence):
    """Influence with the full Hessian in parameter space: g_zᵀ (H + λI)⁻¹ g_i (small models only).

    ``l2`` is the L2 coefficient the model was trained with (it is part of the training objective's
    Hessian); ``damping`` adds relative damping λ = damping · tr(H)/p. The default is the setting that
    works on a network: the positive semi-definite Gauss-Newton Hessian with damping 0.1 (on a wine
    MLP, LDS 0.336 against 0.084 for the exact Hessian undamped, which is indefinite there).
    ``hessian="exact"`` is the true Hessian, for convex models (with ``l2``): a damped Hessian that is
    not positive definite is an error naming the fixes. Scores omit the 1/n factor of a leave-one-out
    effect: τ ≈ n · (m_z(θ without z_i) − m_z(θ)).
    """

    method_name = "exact"

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        *,
        l2: float = 0.0,
        damping: float = 0.1,
        hessian: str = "gauss_newton",
        **kwargs: Any,
    ):
        if (
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (damping, l2))
            or damping < 0
            or l2 < 0
        ):
            raise DunegrassError(
                f"ExactInfluence needs l2 and damping as non-negative numbers (damping is the Hessian's), got "
                f"l2={l2!r}, damping={damping!r}"
            )
        choice(hessian, ("exact", "gauss_newton"), "hessian")
        # the engine's block Fisher is not used: the Hessian solver replaces it (damping is the Hessian's)
        super().__init__(model, task, compressor="identity", damping=None, **kwargs)
        self.l2, self.hessian_damping, self.hessian_mode = l2, damping, hessian

    def config(self, m: int) -> dict:
        return {**super().config(m), "l2": self.l2, "hessian": self.hessian_mode}

    def describe(self) -> dict:
        out = {**super().describe(), "l2": self.l2, "hessian": self.hessian_mode}
        out["damping"] = self.hessian_damping  # the Hessian's, not a block Fisher's
        return out

    def _fit_preconditioner(self, m: int, store, root):
        with load_weights(self.model, self.checkpoints[m]):
            h = damped_hessian(
                self.model,
                self.task,
                self.train_data,
                self.featurizers[m].params,
                self.l2,
                self.hessian_mode,
                self.options.batch_size,
            )
        return _HessianSolver(h, self.hessian_damping)
