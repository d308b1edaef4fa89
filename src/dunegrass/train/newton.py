"""Exact minimisation of weighted, L2-regularised convex objectives by vmapped Newton steps.

Used for leave-one-out ground truth on convex models, where the effects being measured (~1/n) are
far below what stochastic training can resolve. Runs in float64.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, hessian, vmap

from ..data import TensorData, as_data
from ..errors import DunegrassError
from ..gradients.per_sample import FunctionalModel
from ..influence.exact import flat_parameters
from ..task import Task


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

    Returns flat float64 parameters ``[M, p]`` (order of ``model.named_parameters()``), starting
    from ``init`` (default: the model's weights). Stops when every member's step norm is below ``tol``.
    """
    data = as_data(data)
    if not isinstance(data, TensorData):
        raise DunegrassError("newton_fit needs in-memory tensors: pass the data as a tuple (X, y)")
    names = [n for n, _ in model.named_parameters()]
    model64 = _as_double(model)
    if init is not None:
        with torch.no_grad():
            for n, p in model64.named_parameters():
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
        step = torch.linalg.solve(h_fn(theta, w), g_fn(theta, w).unsqueeze(-1)).squeeze(-1)
        theta = theta - step
        if step.norm(dim=1).max() < tol:
            break
    return theta


def _as_double(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).to(torch.float64)


def load_flat(model: nn.Module, flat: Tensor) -> None:
    """Write flat parameters (``newton_fit`` order) into ``model`` in place."""
    names = [n for n, _ in model.named_parameters()]
    _, unflatten = flat_parameters(model, names)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(unflatten(flat.to(p.dtype))[n])
