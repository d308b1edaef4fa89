"""Per-example gradients with torch.func (functional_call + vmap(grad)), in memory-bounded chunks."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from ..errors import DunegrassError, NonFiniteError
from .attention import vmap_safe_attention

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


def frozen_tensors(model: nn.Module, exclude: Collection[str]) -> dict[str, Tensor]:
    """Every parameter (detached) and buffer of ``model`` whose name is not in ``exclude``: what a functional
    call holds fixed while the excluded tensors are supplied (differentiated, stacked per member, ...)."""
    skip = set(exclude)
    out = {n: p.detach() for n, p in model.named_parameters() if n not in skip}
    out.update({n: b for n, b in model.named_buffers() if n not in skip})
    return out


def example_dims(batch: Any) -> Any:
    """vmap's ``in_dims`` for a batch split into examples: 0 for its tensors; anything else it carries (ids,
    texts of a Hugging Face dataset) is passed to every example whole."""
    return tree_map(lambda t: 0 if isinstance(t, Tensor) else None, batch)


def iter_per_sample_gradients(
    model: nn.Module,
    objective_fn: Callable[[nn.Module | FunctionalModel, Any], Tensor],
    batch: Any,
    params: Sequence[str],
    chunk_size: int = 64,
) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(offset, grads [c, d])`` for chunks of at most ``chunk_size`` examples of ``batch``.

    ``grads`` are the gradients of each example's own objective, flattened and concatenated in
    ``params`` order, on the model's device; equal to differentiating each example alone. Memory:
    one chunk, ``chunk_size × d`` numbers (plus vmap's own per-example intermediates), never the
    whole batch's. Raises NonFiniteError naming the offending examples.
    """
    if chunk_size < 1:
        raise DunegrassError(f"chunk_size must be at least 1, got {chunk_size}")
    named = dict(model.named_parameters())
    theta = {n: named[n].detach() for n in params}
    consts = frozen_tensors(model, params)

    def single(theta_: dict[str, Tensor], example: Any) -> Tensor:
        one = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, example)
        values = objective_fn(FunctionalModel(model, {**consts, **theta_}), one)
        return values.sum()

    per_example_grad = vmap(grad(single), in_dims=(None, example_dims(batch)))
    with vmap_safe_attention(model):
        for lo in range(0, _leading(batch), chunk_size):
            chunk = tree_map(lambda t, lo=lo: t[lo : lo + chunk_size] if isinstance(t, Tensor) else t, batch)
            grads = per_example_grad(theta, chunk)
            flat = torch.cat([grads.pop(n).reshape(_leading(chunk), -1) for n in params], dim=1)
            check_finite(flat, "per-example gradient", offset=lo)
            yield lo, flat


def per_sample_gradients(
    model: nn.Module,
    objective_fn: Callable[[nn.Module | FunctionalModel, Any], Tensor],
    batch: Any,
    params: Sequence[str],
    chunk_size: int = 64,
) -> Tensor:
    """``[B, d]``: all of ``iter_per_sample_gradients`` at once (for small models, tests and mask fitting;
    featurisation compresses chunk by chunk instead)."""
    return torch.cat([g for _, g in iter_per_sample_gradients(model, objective_fn, batch, params, chunk_size)])


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
