"""Exact influence for small models: the full damped Hessian (or Gauss-Newton) in parameter space."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import hessian, jacrev, vmap
from torch.utils._pytree import tree_map

from ..data import iterate_batches, to_device
from ..errors import DunegrassError
from ..gradients.attention import vmap_safe_attention
from ..gradients.per_sample import FunctionalModel, example_dims, frozen_tensors
from ..task import Task

MAX_PARAMS = 20_000  # a p × p float64 matrix of 3.2 GB; beyond that use a compressed method


def flat_parameters(model: nn.Module, names: Sequence[str]) -> tuple[Tensor, Callable[[Tensor], dict[str, Tensor]]]:
    """The selected parameters as one vector, and a function mapping such a vector back to a dict."""
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])

    def unflatten(v: Tensor) -> dict[str, Tensor]:
        return {n: p.reshape(s) for n, p, s in zip(names, torch.split(v, sizes), shapes)}

    return flat, unflatten


def _closure(model: nn.Module, names: Sequence[str]):
    """θ flat, and ``proxy(v)``: the model with the selected parameters taken from the flat vector ``v``."""
    consts = frozen_tensors(model, names)
    flat, unflatten = flat_parameters(model, names)
    return flat, lambda v: FunctionalModel(model, {**consts, **unflatten(v)})


def damped_hessian(
    model: nn.Module,
    task: Task,
    data: Any,
    params: Sequence[str],
    l2: float = 0.0,
    mode: str = "exact",
    batch_size: int = 256,
) -> Tensor:
    """``[p, p]`` float64 on the model's device: ∇²_θ mean_i ℓ_i (``mode="exact"``) or its Gauss-Newton
    part, plus ``l2`` I. Batches are moved to the model's device as they are used."""
    if mode not in ("exact", "gauss_newton"):
        raise DunegrassError(f"hessian mode must be 'exact' or 'gauss_newton', got {mode!r}")
    flat, proxy = _closure(model, params)
    p = flat.numel()
    if p > MAX_PARAMS:
        raise DunegrassError(
            f"exact influence needs a {p} x {p} Hessian; that is too large (limit {MAX_PARAMS} parameters). "
            "Restrict params=[...] to a few layers or use a compressed method (GraSS, FactGraSS, LoGra)"
        )
    device = flat.device
    total = torch.zeros(p, p, dtype=torch.float64, device=device)
    n = 0
    with vmap_safe_attention(model):
        for _, batch in iterate_batches(data, batch_size):
            batch = to_device(batch, device)
            b = task.batch_size(batch)
            if mode == "exact":

                def batch_loss(v, batch=batch):
                    return task.loss(task.outputs(proxy(v), batch), batch).sum()

                total += hessian(batch_loss)(flat).to(torch.float64)
            else:
                total += _gauss_newton(task, proxy, flat, batch)
            n += b
    return total / n + l2 * torch.eye(p, dtype=torch.float64, device=device)


def _as_batch(example: Any) -> Any:
    """One example as a batch of one (its non-tensor fields as they are)."""
    return tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, example)


def _gauss_newton(task: Task, proxy, flat: Tensor, batch: Any) -> Tensor:
    """Σ_i J_iᵀ (∂²ℓ_i/∂o²) J_i with J_i the Jacobian of example i's outputs."""

    def outputs_one(v, example):
        return task.outputs(proxy(v), _as_batch(example))[0]

    def loss_of_outputs(o, example):
        return task.loss(o.unsqueeze(0), _as_batch(example))[0]

    dims = example_dims(batch)
    jac = vmap(jacrev(outputs_one), in_dims=(None, dims))(flat, batch)  # [B, *o, p]
    outs = vmap(outputs_one, in_dims=(None, dims))(flat, batch)
    h_out = vmap(hessian(loss_of_outputs), in_dims=(0, dims))(outs, batch)  # [B, *o, *o]
    b = jac.shape[0]
    j = jac.reshape(b, -1, flat.numel()).to(torch.float32)
    h = h_out.reshape(b, j.shape[1], j.shape[1]).to(torch.float32)
    hj = torch.bmm(h, j)  # [B, o, p]: the output Hessian applied first keeps every product a plain matmul
    # fp32 products (2-4x faster than fp64 on CPU), summed over batches in fp64 by the caller
    return (j.reshape(-1, j.shape[-1]).T @ hj.reshape(-1, j.shape[-1])).to(torch.float64)


def damped_cholesky(h: Tensor, damping: float = 0.0) -> Tensor:
    """The lower Cholesky factor of H + damping · tr(H)/p · I. A damped matrix that is not positive definite (the
    exact Hessian of a non-convex model) has no meaningful inverse here: that is an error naming the fixes."""
    p = h.shape[0]
    mat = h + damping * torch.trace(h) / p * torch.eye(p, dtype=h.dtype, device=h.device)
    chol, info = torch.linalg.cholesky_ex(mat)
    if int(info) != 0:
        low = float(torch.linalg.eigvalsh(mat)[0])
        raise DunegrassError(
            f"the damped Hessian is not positive definite (smallest eigenvalue {low:.3g}): the model is not convex "
            f"around θ₀. Use hessian='gauss_newton' (positive semi-definite), more damping than {damping:g} (e.g. "
            f"damping={max(10 * damping, 0.1):g}), or "
            "the L2 coefficient the model was trained with (l2=...)"
        )
    return chol
