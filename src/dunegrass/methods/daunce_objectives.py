"""Daunce's pieces that do not depend on how members are trained (algorithms.md §3).

- the perturbation draws: subsets D_k of ratio r and ε_{k,i} = 2ξ_{k,i} − 1;
- θ₀'s anchors, output gradients q_i = ∂ℓ_i/∂o at θ₀, ⟨o_i(θ₀), q_i⟩ and losses ℓ_i(θ₀), recomputed
  for each training batch (never stored for all examples: for a language model q_i is [T, V]);
- the perturbed objectives as per-example terms, and the signals;
- the covariance scores with their standard errors, whole or streamed chunk by chunk into a sink.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
Signal = Callable[[Tensor, Any], Tensor]  # (outputs [B, ...], batch) -> [B]


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


def check_theta0(
    model: nn.Module, task: Task, data: Any, batch_size: int, device, fn: Signal | None = None, what: str = "training"
) -> None:
    """Check once, before members train or are evaluated, that θ₀ has usable outputs and a finite ``fn``
    (default: the training loss) on every example of ``data`` (an error names the examples: a NaN in an
    input is that example's fault, not a member's). One forward pass; nothing is kept."""
    fn = fn or task.loss
    with torch.no_grad():
        for lo, batch in iterate_batches(data, batch_size):
            batch = to_device(batch, device)
            outputs = check_outputs(task, model, batch)
            task.check_batch(batch, outputs.shape[1:])
            values = fn(outputs, batch)
            try:
                check_finite(values, f"{what} signal at θ₀" if fn is not task.loss else "training loss at θ₀", lo)
            except NonFiniteError as e:
                raise NonFiniteError(f"{e}. Daunce starts from θ₀ and needs finite values there") from None


def theta0_anchors(task: Task, outputs0: Tensor, batch: Any) -> dict[str, Tensor]:
    """``{"q": [B, ...], "oq0": [B], "l0": [B]}`` at θ₀ for one batch, from θ₀'s outputs ``[B, ...]`` on it.

    q_i = ∂ℓ_i/∂o_i: the gradient of Σ_i ℓ_i with respect to the outputs, which is each example's own
    output gradient because ℓ_i depends on o_i only; oq0 = ⟨o_i(θ₀), q_i⟩ (float64); l0 = ℓ_i(θ₀).
    All detached. Computed with torch.func, so it also runs inside the ensemble's vmap(grad(...)).
    """

    def summed(o: Tensor) -> tuple[Tensor, Tensor]:
        loss = task.loss(o, batch)
        return loss.sum(), loss

    out = outputs0.detach()
    q, l0 = torch.func.grad(summed, has_aux=True)(out)
    oq0 = (out.double() * q.double()).flatten(1).sum(1)
    return {"q": q.detach(), "oq0": oq0.detach(), "l0": l0.detach()}


def objective_terms(task: Task, variant: str, rho: float, gamma: float) -> Terms:
    """Per-example terms whose mean over D_k is member k's objective (algorithms.md §3).

    ``if``:   γ(ℓ_i(θ) − ℓ_i(θ₀)) − (1 + ρε_i)⟨o_i(θ) − o_i(θ₀), q_i⟩
    ``efim``: γ(ℓ_i(θ) − ℓ_i(θ₀))² − ρε_i⟨o_i(θ) − o_i(θ₀), q_i⟩
    ``blackbox``: ℓ_i(θ) (plain fine-tuning).
    aux holds θ₀'s anchors q, oq0 = ⟨o_i(θ₀), q_i⟩, l0 (``theta0_anchors``) and eps (per member) for the
    examples of the batch.
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


def anchored_objective(
    task: Task, terms: Terms, theta0_outputs: Callable[[Any], Tensor] | None
) -> Callable[[Tensor, Any, dict[str, Tensor]], Tensor]:
    """Member k's mini-batch objective, mean_{i ∈ batch} terms_i (batches are drawn from D_k only).

    ``theta0_outputs(batch) -> [B, ...]``: θ₀'s outputs on the batch (without tracking gradients);
    θ₀'s anchors (q, ⟨o(θ₀), q⟩, ℓ(θ₀)) are recomputed from them for each batch instead of being
    stored for all n examples, at the price of one more forward per step. Memory: one batch's θ₀
    outputs and q, B × (output size) each (B × T × V for a language model; one per member inside
    the vmapped ensemble), instead of n × (output size). None (``blackbox``): no anchors.
    """

    def objective(outputs: Tensor, batch: Any, aux: dict[str, Tensor]) -> Tensor:
        if theta0_outputs is not None:
            with torch.no_grad():  # θ₀'s forward is a constant of the member's objective
                outputs0 = theta0_outputs(batch)
            aux = {**aux, **theta0_anchors(task, outputs0, batch)}
        return terms(outputs, batch, aux).mean()

    return objective


def signal_fn(task: Task, signal: str) -> Callable[[Tensor, Any], Tensor]:
    """Per-example signal ``[B]``, loss-like (lower is better) so that covariance > 0 means proponent.

    ``loss``: the training loss; ``margin``: minus the classification margin; ``measurement``: the
    task's measurement in loss-like form (``task.query_loss``).

    The tasks' losses keep e^{−margin} for confident examples (``ClassificationTask.loss``, the token
    log-probabilities of ``CausalLMTask``): a float32 cross-entropy computed as logsumexp − x_y is exactly
    0 once p rounds to 1, every member would then agree, and that example's scores and standard errors
    would be exact zeros. A classifier's signals are computed in float64 as well (its logits are small),
    which keeps margins beyond float32's range (e^{−104}).
    """
    if signal not in SIGNALS:
        raise DunegrassError(f"signal must be one of {SIGNALS}, got {signal!r}")
    if signal == "loss":
        base = task.loss
    elif signal == "measurement":
        base = task.query_loss
    elif not isinstance(task, ClassificationTask):
        raise DunegrassError(
            f"signal='margin' needs a ClassificationTask, got {type(task).__name__}; use signal='loss' or 'measurement'"
        )
    else:
        base = ClassificationTask(measurement="margin").query_loss
    if isinstance(task, ClassificationTask):  # [B, C] logits cost nothing in float64, where e^{−120} still exists
        return lambda outputs, batch: base(outputs.to(torch.float64), batch)
    return base


# A scoring chunk's float64 temporaries stay below this: the signals of m training examples across
# K members (the chunk, its centred copy, its squares: 3·K·m) and 5 [n_query, m] arrays.
CHUNK_BYTES = 64 * 2**20


def chunk_columns(num_models: int, n_query: int, budget: int = CHUNK_BYTES) -> int:
    """How many training examples m one scoring chunk covers: 8·m·(3K + 5·n_query) bytes ≤ ``budget``."""
    return max(1, budget // (8 * (3 * num_models + 5 * n_query)))


def _centred(signals: Tensor) -> Tensor:
    return (signals - signals.mean(0)).to(torch.float64)


def _covariance(b: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """Values and standard errors ``[n_query, m]`` (float64) from centred ``b [K, n_query]``, ``a [K, m]``."""
    K = a.shape[0]
    values = (b.T @ a) / (K - 1)
    mu22 = ((b * b).T @ (a * a)) / K
    var_a, var_b = (a * a).sum(0) / (K - 1), (b * b).sum(0) / (K - 1)
    var = (mu22 - values * values).clamp_min(0) / K + (var_b[:, None] * var_a[None, :] + values * values) / (
        K * (K - 1)
    )
    return values, var.sqrt()


def _block_estimates(b: Tensor, a: Tensor, blocks: int) -> Tensor:
    """``[blocks, n_query, m]``: the covariance estimated from each of ``blocks`` contiguous runs of models
    (centred ``b [K, n_query]``, ``a [K, m]``, centred over all K); with runs of equal length their mean is the
    covariance itself."""
    K = a.shape[0]
    return torch.stack([(bj.T @ aj) / len(aj) for bj, aj in zip(b.tensor_split(blocks), a.tensor_split(blocks))]) * (
        K / (K - 1)
    )


def _batch_means(estimates: Tensor) -> Tensor:
    """The standard error of the mean of ``estimates [blocks, ...]`` (batch means: the blocks are taken as
    independent, the models within a block need not be)."""
    return estimates.std(0, unbiased=True) / estimates.shape[0] ** 0.5


def _check_pair(K: int, K_queries: int) -> None:
    if K < 2 or K_queries != K:
        raise DunegrassError(f"covariance needs the same K ≥ 2 models on both sides, got {K} and {K_queries}")


def covariance_scores(train: Tensor, queries: Tensor) -> tuple[Tensor, Tensor]:
    """Sample covariance across models and its standard error, both ``[n_query, n_train]`` (float32).

    ``train [K, n_train]``, ``queries [K, n_query]``: signals of K models. Columns are centred
    across models; S = B_cᵀ A_c / (K − 1). Positive = proponent (training on z_i and doing well on z
    go together). The standard error is the exact finite-sample one of a sample covariance of K
    i.i.d. pairs, Var = (μ₂₂ − σ_ab²)/K + (σ_a²σ_b² + σ_ab²)/(K(K − 1)), with plug-in moments; it
    shrinks as 1/√K (and, like any plug-in, runs slightly low at small K: about 10 % at K = 40).
    The whole matrix at once; ``covariance_into`` streams it chunk by chunk.
    """
    _check_pair(train.shape[0], queries.shape[0])
    values, stderr = _covariance(_centred(queries), _centred(train))
    return values.to(torch.float32), stderr.to(torch.float32)


def covariance_into(
    sink: Any,
    train_chunks: Iterable[tuple[int, Tensor]],
    queries: Tensor,
    device: torch.device | str = "cpu",
    blocks: int | None = None,
    normalize: bool = False,
) -> None:
    """Feed ``sink`` (``scores.make_sink``) the covariance scores of ``covariance_scores``, chunk by chunk.

    ``train_chunks`` yields ``(start, A[:, start:start + m])`` with ``A [K, n_train]``; ``queries
    [K, n_query]``. Each chunk is centred and scored on ``device``: memory per chunk is that of
    ``chunk_columns`` (the K × m signals and n_query × m values; with ``blocks``, ``blocks`` times the
    values), whatever n_train is. ``blocks``: the models are that many contiguous runs of correlated draws
    (SGLD chains), so the standard error is the batch means' one over the runs, not the i.i.d. formula.
    ``normalize``: Pearson correlations instead (each covariance divided by the two signals' standard
    deviations across the models, and its standard error with it: exact to first order for small correlations).
    """
    b = _centred(queries).to(device)
    sd_b = (b * b).sum(0).div(b.shape[0] - 1).sqrt().clamp_min(1e-300)
    for start, a in train_chunks:
        _check_pair(a.shape[0], b.shape[0])
        a = _centred(a.to(device))
        if blocks is None:
            values, stderr = _covariance(b, a)
        else:
            values, stderr = (b.T @ a) / (a.shape[0] - 1), _batch_means(_block_estimates(b, a, blocks))
        if normalize:
            scale = sd_b[:, None] * (a * a).sum(0).div(a.shape[0] - 1).sqrt().clamp_min(1e-300)[None, :]
            values, stderr = values / scale, stderr / scale
        sink.add(start, values.to(torch.float32), stderr.to(torch.float32))


def variance_with_stderr(signals: Tensor, blocks: int | None = None) -> tuple[Tensor, Tensor]:
    """Each column's sample variance across the K members of ``signals [K, m]`` and its standard error: the
    covariance estimator's (``covariance_scores``) with both sides the same signal, (μ₄ − σ⁴)/K + 2σ⁴/(K(K − 1));
    with ``blocks`` (runs of correlated draws), batch means over the runs."""
    K = signals.shape[0]
    a = signals.to(torch.float64) - signals.to(torch.float64).mean(0)
    if blocks is not None:
        estimates = torch.stack([(aj * aj).mean(0) for aj in a.tensor_split(blocks)]) * (K / (K - 1))
        return ((a * a).sum(0) / (K - 1)).to(torch.float32), _batch_means(estimates).to(torch.float32)
    var = (a * a).sum(0) / (K - 1)
    mu4 = (a**4).mean(0)
    err = ((mu4 - var * var).clamp_min(0) / K + 2 * var * var / (K * (K - 1))).sqrt()
    return var.to(torch.float32), err.to(torch.float32)
