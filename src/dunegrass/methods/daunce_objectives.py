"""Daunce's pieces that do not depend on how members are trained (algorithms.md §3).

- the perturbation draws: subsets D_k of ratio r and ε_{k,i} = 2ξ_{k,i} − 1;
- θ₀'s anchors: outputs o_i(θ₀), output gradients q_i = ∂ℓ_i/∂o at θ₀ and losses ℓ_i(θ₀);
- the perturbed objectives as per-example terms, and the signals;
- the covariance scores with their standard errors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..data import iterate_batches, to_device
from ..errors import DunegrassError, NonFiniteError
from ..gradients.per_sample import check_finite
from ..seeding import derive_seed
from ..task import ClassificationTask, Task
from ..train import Member

VARIANTS = ("if", "efim", "blackbox")
SIGNALS = ("loss", "margin", "measurement")

# Independent seed streams of one Daunce run.
SUBSET_STREAM, EPS_STREAM, ORDER_STREAM = 0x737562, 0x657073, 0x6F7264

Terms = Callable[[Tensor, Any, dict[str, Tensor]], Tensor]  # (outputs [B, ...], batch, aux) -> [B]


def draw_members(n: int, num_models: int, ratio: float, seed: int) -> list[Member]:
    """Member k trains on round(ratio · n) examples drawn without replacement, with its own seed.

    Each member's draws come from its own seed stream, so member k is the same whatever K is
    (growing K keeps the first members) and whichever back end trains it.
    """
    size = max(1, int(round(ratio * n)))
    members = []
    for k in range(num_models):
        gen = torch.Generator().manual_seed(derive_seed(seed, k, SUBSET_STREAM))
        idx = torch.randperm(n, generator=gen)[:size].sort().values
        members.append(Member(idx, derive_seed(seed, k, ORDER_STREAM)))
    return members


def draw_eps(n: int, members: range, seed: int) -> Tensor:
    """``[len(members), n]`` ε = 2ξ − 1 with ξ ~ U(0, 1): one draw per (member, training example),
    fixed for all of that member's epochs (only entries in the member's subset are used)."""
    rows = []
    for k in members:
        gen = torch.Generator().manual_seed(derive_seed(seed, k, EPS_STREAM))
        rows.append(2.0 * torch.rand(n, generator=gen, dtype=torch.float64) - 1.0)
    return torch.stack(rows)


def check_outputs(task: Task, model: nn.Module, batch: Any) -> Tensor:
    """θ₀'s outputs on one batch, or a clear error if the task has no usable outputs."""
    try:
        out = task.outputs(model, batch)
    except NotImplementedError as e:
        raise DunegrassError(
            f"{type(task).__name__}.outputs is not implemented; Daunce linearises the objective in output space, "
            "so the task must return model outputs [B, ...] (e.g. logits) from outputs(model, batch)"
        ) from e
    if not isinstance(out, Tensor) or out.ndim == 0 or out.shape[0] != task.batch_size(batch):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise DunegrassError(
            f"{type(task).__name__}.outputs must return a tensor [B, ...] with one row per example, got {shape}; "
            "Daunce linearises the objective in the model's outputs"
        )
    return out


def theta0_anchors(model: nn.Module, task: Task, data: Any, batch_size: int, device) -> dict[str, Tensor]:
    """``{"oq0": [n], "q": [n, ...], "l0": [n]}`` at θ₀, computed once and shared by all members.

    q_i = ∂ℓ_i/∂o_i: the gradient of Σ_i ℓ_i with respect to the outputs, which is each example's own
    output gradient because ℓ_i depends on o_i only. Detached. θ₀'s outputs enter the objective only
    through ⟨o_i(θ₀), q_i⟩, so that scalar is kept instead of o_i(θ₀) (for a language model, a
    [sequence, vocabulary] tensor per example).
    """
    oq0, q, l0 = [], [], []
    for lo, batch in iterate_batches(data, batch_size):
        batch = to_device(batch, device)
        with torch.no_grad():
            out = check_outputs(task, model, batch)
        out = out.detach().requires_grad_(True)
        loss = task.loss(out, batch)
        try:
            check_finite(loss, "training loss at θ₀", offset=lo)
        except NonFiniteError as e:
            raise NonFiniteError(f"{e}. Daunce starts from θ₀ and needs finite losses there") from None
        (grad,) = torch.autograd.grad(loss.sum(), out)
        oq0.append((out.detach().double() * grad.double()).flatten(1).sum(1).cpu())
        q.append(grad.detach().cpu())
        l0.append(loss.detach().cpu())
    return {"oq0": torch.cat(oq0), "q": torch.cat(q), "l0": torch.cat(l0)}


def objective_terms(task: Task, variant: str, rho: float, gamma: float) -> Terms:
    """Per-example terms whose mean over D_k is member k's objective (algorithms.md §3).

    ``if``:   γ(ℓ_i(θ) − ℓ_i(θ₀)) − (1 + ρε_i)⟨o_i(θ) − o_i(θ₀), q_i⟩
    ``efim``: γ(ℓ_i(θ) − ℓ_i(θ₀))² − ρε_i⟨o_i(θ) − o_i(θ₀), q_i⟩
    ``blackbox``: ℓ_i(θ) (plain fine-tuning).
    aux holds oq0 = ⟨o_i(θ₀), q_i⟩, q, l0 (shared) and eps (per member) for the examples of the batch.
    """
    if variant not in VARIANTS:
        raise DunegrassError(f"variant must be one of {VARIANTS}, got {variant!r}")

    def terms(outputs: Tensor, batch: Any, aux: dict[str, Tensor]) -> Tensor:
        loss = task.loss(outputs, batch)
        if variant == "blackbox":
            return loss
        lin = (outputs * aux["q"].to(outputs.dtype)).flatten(1).sum(1) - aux["oq0"].to(outputs.dtype)
        dl = loss - aux["l0"].to(loss.dtype)
        eps = aux["eps"].to(loss.dtype)
        if variant == "if":
            return gamma * dl - (1.0 + rho * eps) * lin
        return gamma * dl * dl - rho * eps * lin

    return terms


def mean_objective(terms: Terms) -> Callable[[Tensor, Any, dict[str, Tensor]], Tensor]:
    """The mini-batch estimate of mean_{i ∈ D_k}: batches are drawn from D_k only."""
    return lambda outputs, batch, aux: terms(outputs, batch, aux).mean()


def signal_fn(task: Task, signal: str) -> Callable[[Tensor, Any], Tensor]:
    """Per-example signal ``[B]``, loss-like (lower is better) so that covariance > 0 means proponent.

    ``loss``: the training loss; ``margin``: minus the classification margin; ``measurement``: the
    task's measurement in loss-like form (``task.query_loss``).
    """
    if signal not in SIGNALS:
        raise DunegrassError(f"signal must be one of {SIGNALS}, got {signal!r}")
    if signal == "loss":
        return task.loss
    if signal == "measurement":
        return task.query_loss
    if not isinstance(task, ClassificationTask):
        raise DunegrassError(
            f"signal='margin' needs a ClassificationTask, got {type(task).__name__}; use signal='loss' or 'measurement'"
        )
    margin_task = ClassificationTask(measurement="margin")
    return margin_task.query_loss


def covariance_scores(train: Tensor, queries: Tensor) -> tuple[Tensor, Tensor]:
    """Sample covariance across models and its standard error, both ``[n_query, n_train]``.

    ``train [K, n_train]``, ``queries [K, n_query]``: signals of K models. Columns are centred
    across models; S = B_cᵀ A_c / (K − 1). Positive = proponent (training on z_i and doing well on z
    go together). The standard error is the exact finite-sample one of a sample covariance of K
    i.i.d. pairs, Var = (μ₂₂ − σ_ab²)/K + (σ_a²σ_b² + σ_ab²)/(K(K − 1)), with plug-in moments; it
    shrinks as 1/√K (and, like any plug-in, runs slightly low at small K: about 10 % at K = 40).
    """
    K = train.shape[0]
    if K < 2 or queries.shape[0] != K:
        raise DunegrassError(f"covariance needs the same K ≥ 2 models on both sides, got {K} and {queries.shape[0]}")
    a = (train - train.mean(0)).to(torch.float64)
    b = (queries - queries.mean(0)).to(torch.float64)
    values = (b.T @ a) / (K - 1)
    mu22 = ((b * b).T @ (a * a)) / K
    var_a, var_b = (a * a).sum(0) / (K - 1), (b * b).sum(0) / (K - 1)
    var = (mu22 - values * values).clamp_min(0) / K + (var_b[:, None] * var_a[None, :] + values * values) / (
        K * (K - 1)
    )
    return values.to(torch.float32), var.sqrt().to(torch.float32)
