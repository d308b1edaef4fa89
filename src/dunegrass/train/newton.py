"""Exact minimisation of weighted, L2-regularised convex objectives by vmapped Newton steps.

Used for leave-one-out ground truth on convex models, where the effects being measured (~1/n) are
far below what stochastic training can resolve. Runs in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, hessian, vmap
from torch.utils._pytree import tree_map

from ..data import TensorData, as_data
from ..errors import DunegrassError, NonFiniteError
from ..gradients.per_sample import FunctionalModel
from ..influence.exact import flat_parameters
from ..task import Task
from .ensemble import trainable_names


def newton_fit(
    model: nn.Module,
    task: Task,
    data: Any,
    weights: Tensor,
    l2: float,
    init: Mapping[str, Tensor] | None = None,
    steps: int = 20,
    tol: float = 1e-10,
) -> Tensor:
    """Minimise Σ_i w_i ℓ_i / n + (l2/2)‖θ‖² for each row of ``weights [M, n]``.

    Dividing by the full n (not Σ w) keeps the balance of data and regulariser when examples are
    removed, as in scikit-learn's ``C Σ ℓ_i + ½‖θ‖²`` and in the influence-function definition
    (removal = up-weighting by −1/n).

    Returns flat float64 trainable parameters ``[M, p]`` (``trainable_names`` order; frozen ones stay as they
    are), starting from ``init`` (default: the model's weights). Stops when every member's step norm is below
    ``tol``; an error if it does not within ``steps``.
    """
    data = as_data(data)
    if not isinstance(data, TensorData):
        raise DunegrassError("newton_fit needs in-memory tensors: pass the data as a tuple (X, y)")
    if steps < 1:
        raise DunegrassError(f"newton_fit needs steps >= 1, got {steps}")
    names = trainable_names(model)
    model64 = _as_double(model)
    if init is not None:
        with torch.no_grad():
            for n, p in model64.named_parameters():
                if n in names:
                    p.copy_(init[n].to(torch.float64))
    flat, unflatten = flat_parameters(model64, names)
    batch = tuple(t.to(torch.float64) if t.is_floating_point() else t for t in data.slice(slice(None)))
    w = weights.to(torch.float64)

    def objective(v: Tensor, wrow: Tensor) -> Tensor:
        out = task.outputs(FunctionalModel(model64, unflatten(v)), batch)
        return (wrow * task.loss(out, batch)).sum() / wrow.numel() + 0.5 * l2 * (v * v).sum()

    g_fn = vmap(grad(objective))
    h_fn = vmap(hessian(objective))
    theta = flat.unsqueeze(0).repeat(w.shape[0], 1)
    for _ in range(steps):
        try:
            step = torch.linalg.solve(h_fn(theta, w), g_fn(theta, w).unsqueeze(-1)).squeeze(-1)
        except torch.linalg.LinAlgError as e:
            raise DunegrassError(
                f"the Hessian is singular ({e}): exact refits need a strictly convex objective; pass the L2 "
                "coefficient the model was trained with (l2 > 0; a softmax has directions its loss never sees)"
            ) from e
        theta = theta - step
        if step.norm(dim=1).max() < tol:
            return theta
    raise DunegrassError(
        f"Newton's method did not converge in {steps} steps (last step norm {float(step.norm(dim=1).max()):.3g}): "
        "exact refits are for convex models (linear or logistic regression with l2 > 0), not networks; use "
        "subset_retraining for those"
    )


def _as_double(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).to(torch.float64)


def load_flat(model: nn.Module, flat: Tensor) -> None:
    """Write flat parameters (``newton_fit`` order: the trainable ones) into ``model`` in place."""
    names = trainable_names(model)
    _, unflatten = flat_parameters(model, names)
    values = unflatten(flat.to(next(model.parameters()).dtype))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in values:
                p.copy_(values[n])


def newton_minimize(
    model: nn.Module,
    task: Task,
    data: Any,
    terms: Callable[[Tensor, Any, dict[str, Tensor]], Tensor],
    subsets: Tensor,
    per_member: Mapping[str, Tensor] | None = None,
    shared: Mapping[str, Tensor] | None = None,
    l2: float = 0.0,
    center: Tensor | None = None,
    steps: int = 50,
    tol: float = 1e-10,
) -> Tensor:
    """Minimise mean_{i ∈ S_k} terms_i(θ) + (l2/2)‖θ − center‖² exactly, for each member k.

    ``subsets [M, m]``: the training indices S_k of each member. ``terms(outputs [m, ...], batch,
    aux) -> [m]`` are per-example terms that depend on example i's outputs only; ``aux`` holds
    ``shared [n, ...]`` and ``per_member [M, n, ...]`` tensors gathered at S_k. ``center`` is a flat
    parameter vector (default 0: ordinary L2). Starts from the model's weights; float64; returns flat
    trainable parameters ``[M, p]`` (``trainable_names`` order; frozen ones stay as they are).

    Built for models whose outputs are linear in the parameters (linear and logistic regression):
    the Hessian mean_i J_iᵀ ∇²_o terms_i J_i + l2·I uses the output Jacobians J_i taken once, which
    is exact there, so members converge in a few steps. The stopping test uses the exact gradient
    (autograd), so a returned θ is a true minimiser whatever the model; a model far from linear may
    not converge, which raises an error.
    """
    data = as_data(data)
    if not isinstance(data, TensorData):
        raise DunegrassError("newton_minimize needs in-memory tensors: pass the data as a tuple (X, y)")
    names = trainable_names(model)
    model64 = _as_double(model)
    flat, unflatten = flat_parameters(model64, names)
    device = flat.device  # data and anchors may live on the CPU
    full = tuple((t.to(torch.float64) if t.is_floating_point() else t).to(device) for t in data.slice(slice(None)))
    idx = torch.as_tensor(subsets, dtype=torch.long)
    M, m = idx.shape
    rows = torch.arange(M)[:, None]
    to64 = lambda v: v.to(torch.float64) if v.is_floating_point() else v  # noqa: E731
    batches = tuple(t[idx.to(device)] for t in full)  # [M, m, ...]
    aux = {k: to64(v)[idx].to(device) for k, v in (shared or {}).items()}
    aux.update({k: to64(v)[rows, idx].to(device) for k, v in (per_member or {}).items()})
    c = torch.zeros_like(flat) if center is None else center.to(torch.float64)

    def outputs(v: Tensor, batch: Any) -> Tensor:
        return task.outputs(FunctionalModel(model64, unflatten(v)), batch)

    def data_term(out: Tensor, batch: Any, aux_k: dict[str, Tensor]) -> Tensor:
        return terms(out, batch, aux_k).sum() / m

    def total(v: Tensor, batch: Any, aux_k: dict[str, Tensor]) -> Tensor:
        d = v - c
        return data_term(outputs(v, batch), batch, aux_k) + 0.5 * l2 * (d * d).sum()

    jac = torch.func.jacrev(outputs)(flat, full)  # [n, *o, p]
    n, p = jac.shape[0], flat.numel()
    jac = jac.reshape(n, -1, p)[idx]  # [M, m, o, p]
    exact_grad = vmap(grad(total))
    objective = vmap(total)
    # terms_i sees o_i only, so ∇²_o of the objective is block diagonal: treat all (member, example)
    # pairs as one flat batch and take one double-backward per output coordinate.
    flat_batch = tree_map(lambda t: t.reshape(M * m, *t.shape[2:]), batches)
    flat_aux = {k: v.reshape(M * m, *v.shape[2:]) for k, v in aux.items()}

    def out_hessian(theta: Tensor) -> Tensor:
        with torch.no_grad():
            outs = vmap(outputs)(theta, batches)
        o = outs.reshape(M * m, *outs.shape[2:]).requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(terms(o, flat_batch, flat_aux).sum() / m, o, create_graph=True)
            g = g.reshape(M * m, -1)
            cols = [
                torch.autograd.grad(g[:, j].sum(), o, retain_graph=True)[0].reshape(M * m, -1)
                for j in range(g.shape[1])
            ]
        return torch.stack(cols, dim=-1).reshape(M, m, g.shape[1], g.shape[1])

    eye = torch.eye(p, dtype=torch.float64, device=device)
    theta = flat.unsqueeze(0).repeat(M, 1)
    for _ in range(steps):
        g = exact_grad(theta, batches, aux)
        if not torch.isfinite(g).all():
            raise NonFiniteError("Newton's method diverged; add L2 (l2=...) or weaken the perturbation")
        if g.norm(dim=1).max() < tol:
            return theta
        h_out = out_hessian(theta)  # [M, m, o, o]
        jh = torch.matmul(h_out, jac)  # [M, m, o, p]
        hess = torch.bmm(jac.reshape(M, -1, p).transpose(1, 2), jh.reshape(M, -1, p)) + l2 * eye
        theta = _line_search(objective, theta, g, torch.linalg.solve(hess, g.unsqueeze(-1)).squeeze(-1), batches, aux)
    worst = float(exact_grad(theta, batches, aux).norm(dim=1).max())
    if worst < tol:  # the last step converged
        return theta
    raise DunegrassError(
        f"Newton's method did not converge in {steps} steps (gradient norm {worst:.2e}); the objective is "
        "not convex enough around the start or the outputs are far from linear in the parameters: add L2 "
        "(l2=...), weaken the perturbation or use an SGD back end"
    )


def _line_search(objective, theta: Tensor, g: Tensor, step: Tensor, batches, aux, shrink: int = 40) -> Tensor:
    """``theta − α·step`` per member, with the largest α in 1, ½, ¼, … that decreases the objective enough
    (Armijo): a full Newton step can overshoot where the curvature changes fast (a logistic loss on nearly
    separable data with a strong perturbation), a damped one still converges; near the optimum α = 1."""
    f = objective(theta, batches, aux)
    slope = (g * step).sum(1)  # > 0 where the step descends (a positive definite Hessian)
    decrease = 1e-4 * slope
    slack = 1e-12 * f.abs()  # rounding: near the optimum f changes by less than its last digits
    alpha = torch.ones_like(f)
    for _ in range(shrink):
        candidate = theta - alpha[:, None] * step
        # a member whose Hessian is indefinite here (efim's) gets no descent guarantee: it takes the full step
        ok = (objective(candidate, batches, aux) <= f - alpha * decrease + slack) | (slope <= 0)
        if bool(ok.all()):
            return candidate
        alpha = torch.where(ok, alpha, alpha / 2)
    return theta - alpha[:, None] * step
