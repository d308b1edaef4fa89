"""Per-example gradients with torch.func (functional_call + vmap(grad)), in memory-bounded chunks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from ..errors import DunegrassError, NonFiniteError

Objective = Callable[[Tensor, Any], Tensor]


def select_parameters(model: nn.Module, names: Sequence[str] | None = None) -> list[str]:
    """Names of the parameters to differentiate: ``names`` checked against the model, or all trainable ones."""
    available = dict(model.named_parameters())
    if names is None:
        chosen = [n for n, p in available.items() if p.requires_grad]
        if not chosen:
            raise DunegrassError("the model has no trainable parameters; pass params=[...] explicitly")
        return chosen
    names = list(names)
    unknown = [n for n in names if n not in available]
    if unknown:
        preview = ", ".join(list(available)[:8]) + (", ..." if len(available) > 8 else "")
        raise DunegrassError(
            f"unknown parameter names {unknown}; the model's parameters are: {preview}. "
            "Use names from model.named_parameters()."
        )
    if not names:
        raise DunegrassError("params is empty; name at least one parameter or pass params=None for all")
    return names


def parameter_count(model: nn.Module, names: Sequence[str]) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in names)


class FunctionalModel:
    """A stand-in for ``model`` whose forward uses the given parameters; other attributes pass through."""

    def __init__(self, model: nn.Module, tensors: dict[str, Tensor]):
        self._model = model
        self._tensors = tensors

    def __call__(self, *args, **kwargs):
        return functional_call(self._model, self._tensors, args, kwargs)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def _constants(model: nn.Module, names: Sequence[str]) -> dict[str, Tensor]:
    chosen = set(names)
    consts = {n: p.detach() for n, p in model.named_parameters() if n not in chosen}
    consts.update(dict(model.named_buffers()))
    return consts


def per_sample_gradients(
    model: nn.Module,
    objective_fn: Callable[[nn.Module | FunctionalModel, Any], Tensor],
    batch: Any,
    params: Sequence[str],
    chunk_size: int = 64,
) -> Tensor:
    """Gradients of each example's own objective, flattened and concatenated in ``params`` order.

    ``objective_fn(model, batch) -> [B]`` returns per-example values (e.g. ``task.loss`` of
    ``task.outputs``). Returns ``[B, d]`` with ``d`` = number of selected parameters; equal to
    differentiating each example alone. Raises NonFiniteError naming the offending examples.
    """
    named = dict(model.named_parameters())
    theta = {n: named[n].detach() for n in params}
    consts = _constants(model, params)

    def single(theta_: dict[str, Tensor], example: Any) -> Tensor:
        one = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, example)
        values = objective_fn(FunctionalModel(model, {**consts, **theta_}), one)
        return values.sum()

    per_example_grad = vmap(grad(single), in_dims=(None, 0))
    batch_size = _leading(batch)
    rows = []
    for lo in range(0, batch_size, chunk_size):
        chunk = tree_map(lambda t, lo=lo: t[lo : lo + chunk_size] if isinstance(t, Tensor) else t, batch)
        grads = per_example_grad(theta, chunk)
        rows.append(torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in params], dim=1))
    out = torch.cat(rows)
    check_finite(out, "per-example gradient")
    return out


def check_finite(x: Tensor, what: str, offset: int = 0) -> None:
    """Raise NonFiniteError naming the example rows of ``x`` that hold NaN or inf."""
    if x.ndim == 0:
        if not torch.isfinite(x):
            raise NonFiniteError(f"the {what} is {x.item()}; check the learning rate, inputs and labels")
        return
    bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    if bad.any():
        rows = (bad.nonzero()[:, 0] + offset).tolist()
        raise NonFiniteError(
            f"the {what} is NaN or infinite for example(s) {rows[:10]}{' ...' if len(rows) > 10 else ''}; "
            "check those inputs/labels and the model (a diverged checkpoint, log(0), a bad label)"
        )


def _leading(batch: Any) -> int:
    from ..task import first_tensor

    return int(first_tensor(batch).shape[0])
