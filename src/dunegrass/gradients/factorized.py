"""Factorised capture for linear layers: each example's x_t and δ_t, never its weight gradient.

A linear layer y_t = W x_t + b (``nn.Linear``, or Hugging Face's ``Conv1D`` whose weight is stored
transposed) has the per-example gradient G = Σ_t δ_t x̃_tᵀ (d_out × d_in, plus one column for the bias:
x̃_t = [x_t; 1]), with δ_t = ∂ℓ/∂y_t of that example's own loss (algorithms.md §2.1).

How: a forward hook on each selected layer keeps its input x and returns ``y + z``, where ``z`` is one
shared scalar zero that requires grad. ``torch.autograd.grad(Σ_b ℓ_b, z)`` then walks back through
every selected layer's output; a tensor hook on ``y + z`` receives δ as soon as it is complete and
hands (x, δ) to a callback (the constant 1 of x̃ is left to the consumer: appending it here would copy
every layer input). Because only ``z`` is asked for, autograd never computes a weight gradient (nor
any gradient upstream of the first selected layer) and never touches ``param.grad``; because the loss
is a sum of per-example losses, δ is each example's own gradient. Frozen layers work too (``z`` makes
their outputs require grad). Padding needs no special case: a position that no loss term depends on
gets δ_t = 0 exactly. A layer called several times contributes once per call (its gradients add up).
"""

from __future__ import annotations

import fnmatch
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DunegrassError
from .per_sample import check_finite

ModuleSelection = str | type | Sequence[str | type] | None
FactorCallback = Callable[[int, Tensor, Tensor], None]  # (layer index, x [B, T, d_in], δ [B, T, d_out])


def linear_types() -> tuple[type, ...]:
    """The layer types factorised capture supports: ``nn.Linear`` and, once transformers is imported, its Conv1D."""
    types: tuple[type, ...] = (nn.Linear,)
    # A model holding a Conv1D has imported transformers already; never import it here (optional extra).
    hf = sys.modules.get("transformers.pytorch_utils")
    if hf is not None and hasattr(hf, "Conv1D"):
        types += (hf.Conv1D,)
    return types


@dataclass
class LinearLayer:
    """One selected linear layer. ``in_dim`` counts the appended 1 when the layer has a bias."""

    name: str
    module: nn.Module
    in_features: int
    out_features: int
    has_bias: bool
    transposed: bool  # Conv1D: weight stored as [in, out]

    @property
    def in_dim(self) -> int:
        return self.in_features + int(self.has_bias)

    @property
    def out_dim(self) -> int:
        return self.out_features

    def split_gradient(self, grad: Tensor) -> dict[str, Tensor]:
        """Map G ``[B, d_out, in_dim]`` to ``{"weight": ..., "bias": ...}`` shaped like the layer's parameters (+B)."""
        weight = grad[:, :, : self.in_features]
        out = {"weight": weight.transpose(1, 2) if self.transposed else weight}
        if self.has_bias:
            out["bias"] = grad[:, :, self.in_features]
        return out


def _describe(module: nn.Module) -> LinearLayer | None:
    if isinstance(module, nn.Linear):
        return LinearLayer("", module, module.in_features, module.out_features, module.bias is not None, False)
    if isinstance(module, linear_types()):  # Conv1D: weight [nx, nf]
        nx, nf = module.weight.shape
        return LinearLayer("", module, int(nx), int(nf), getattr(module, "bias", None) is not None, True)
    return None


def linear_layers(model: nn.Module, modules: ModuleSelection = None) -> list[LinearLayer]:
    """The layers to capture, in the model's module order.

    ``modules``: None (every ``nn.Linear``/``Conv1D`` whose weight no other module shares, except the
    ``out_proj`` of ``nn.MultiheadAttention``, which that module never calls), or names,
    ``fnmatch`` patterns (``"transformer.h.*.mlp.*"``) and types (``nn.Linear``), alone or in a list.
    An exact name must be a supported layer; a pattern or type keeps the supported layers it matches
    and must match one. The default skips tied layers (GPT-2's ``lm_head`` shares the token embedding):
    their captured gradient would be only one use's share of the shared weight's gradient.
    """
    named = dict(model.named_modules())
    supported = {n: layer for n, m in named.items() if n and (layer := _describe(m)) is not None}
    if modules is None:
        shared = _shared_weights(model)
        # nn.MultiheadAttention calls F.linear on out_proj.weight, never the module: hooks cannot see it.
        unseen = {id(m.out_proj) for m in named.values() if isinstance(m, nn.MultiheadAttention)}
        chosen = {
            n
            for n, layer in supported.items()
            if id(layer.module.weight) not in shared and id(layer.module) not in unseen
        }
    else:
        items = [modules] if isinstance(modules, (str, type)) else list(modules)
        if not items:
            raise DunegrassError("modules is empty; name at least one layer, or pass modules=None for all")
        chosen = set()
        for item in items:
            chosen |= _match(item, named, supported)
    if not chosen and modules is None and supported:
        raise DunegrassError(
            f"every nn.Linear/Conv1D layer of {type(model).__name__} shares its weight with another module "
            f"(tied: {', '.join(list(supported)[:4])}), so none is selected by default; name them in modules=[...]"
        )
    if not chosen:
        raise DunegrassError(
            f"{type(model).__name__} has no nn.Linear or Conv1D layers; factorised capture (LoGra, FactGraSS) "
            "needs linear layers. Use dg.GradientInfluence / GraSS (materialised gradients) for this model."
        )
    layers = []
    for name in named:  # module order, so features are laid out the same way every time
        if name in chosen:
            layer = supported[name]
            layer.name = name
            layers.append(layer)
    return layers


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters held by more than one module (tied weights)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, count in seen.items() if count > 1}


def _match(item: str | type, named: dict[str, nn.Module], supported: dict[str, LinearLayer]) -> set[str]:
    kinds = "nn.Linear and transformers' Conv1D"
    if isinstance(item, type):
        if not any(issubclass(item, t) or issubclass(t, item) for t in linear_types()):
            raise DunegrassError(
                f"layer type {item.__name__} is not supported by factorised capture (it handles {kinds}); "
                "use dg.GradientInfluence / GraSS with materialised gradients for other layers"
            )
        found = {n for n, layer in supported.items() if isinstance(layer.module, item)}
        if not found:
            raise DunegrassError(f"the model has no {item.__name__} layers")
        return found
    if not isinstance(item, str):
        raise DunegrassError(f"select layers by name, pattern or type; got {type(item).__name__}")
    if any(c in item for c in "*?["):
        found = {n for n in supported if fnmatch.fnmatchcase(n, item)}
        if not found:
            raise DunegrassError(
                f"the pattern {item!r} matches no {kinds} layer; linear layers are: {_preview(supported)}"
            )
        return found
    if item not in named:
        raise DunegrassError(f"the model has no module named {item!r}; linear layers are: {_preview(supported)}")
    if item not in supported:
        raise DunegrassError(
            f"module {item!r} is a {type(named[item]).__name__}; factorised capture supports {kinds} only. "
            "Select linear layers, or use dg.GradientInfluence / GraSS (materialised gradients) for other layers."
        )
    return {item}


def _preview(supported: dict) -> str:
    names = list(supported)
    return ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") if names else "(none)"


def capture_factors(
    model: nn.Module,
    layers: Sequence[LinearLayer],
    objective: Callable[[nn.Module, Any], Tensor],
    batch: Any,
    on_factors: FactorCallback,
) -> Tensor:
    """Run ``objective(model, batch) -> [B]`` once and hand each layer's (x, δ) to ``on_factors``.

    ``on_factors(i, inputs [B, T, d_in], grads [B, T, d_out])`` is called during the backward pass,
    once per call of layer ``layers[i]`` (T flattens any dimensions between batch and features; a
    ``[B, d]`` input has T = 1). δ is the gradient of Σ_b ℓ_b, i.e. of each example's own loss.
    Returns the objective's values ``[B]`` (detached). Hooks are removed however this exits.
    """
    with warnings.catch_warnings():  # transformers 5 renamed the flag and warns on the old name
        warnings.simplefilter("ignore", FutureWarning)
        checkpointing = getattr(model, "is_activation_checkpointing", None)
        if checkpointing is None:
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing:
        raise DunegrassError(
            "factorised capture cannot run with gradient checkpointing (the recomputed forward would capture "
            "twice); call model.gradient_checkpointing_disable() first"
        )
    state: dict[str, Any] = {"z": None, "batch": None}
    ran: set[int] = set()
    handles = []

    def forward_hook(index: int):
        layer = layers[index]

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
            x = args[0] if args else next(iter(kwargs.values()))
            ran.add(index)
            # x is kept by reference: remember its version, so that an in-place change made to it later in
            # the forward pass (which would corrupt the captured factor) is caught when δ arrives.
            version, x = x._version, x.detach()
            if state["z"] is None:
                state["z"] = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
            tapped = output + state["z"]
            tapped.register_hook(lambda grad: _deliver(index, layer, x, version, grad, state, on_factors))
            return tapped

        return hook

    try:
        for i, layer in enumerate(layers):
            handles.append(layer.module.register_forward_hook(forward_hook(i), with_kwargs=True))
        with torch.enable_grad():
            values = objective(model, batch)
            if values.ndim != 1:
                raise DunegrassError(f"the objective must return one value per example [B], got {tuple(values.shape)}")
            check_finite(values.detach(), "per-example loss")
            state["batch"] = values.shape[0]
            idle = [layer.name for i, layer in enumerate(layers) if i not in ran]
            if idle:
                raise DunegrassError(
                    f"selected layers never ran as modules in the forward pass: {', '.join(idle[:6])}"
                    f"{', ...' if len(idle) > 6 else ''}. Their weights may be used directly (as nn.MultiheadAttention "
                    "uses out_proj.weight), which hooks cannot see; leave them out with modules=[...]"
                )
            if values.requires_grad:
                torch.autograd.grad(values.sum(), state["z"], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return values.detach()


def _deliver(
    index: int, layer: LinearLayer, x: Tensor, version: int, grad: Tensor, state: dict, on_factors: FactorCallback
):
    if x._version != version:
        raise DunegrassError(
            f"the input of layer {layer.name!r} was modified in place after the layer ran, so its captured "
            "factor is no longer the input the layer saw; make that operation out of place"
        )
    batch = state["batch"]
    if x.ndim < 2 or x.shape[0] != batch or grad.shape[:-1] != x.shape[:-1]:
        raise DunegrassError(
            f"layer {layer.name!r} saw an input of shape {tuple(x.shape)} for a batch of {batch} examples; "
            "factorised capture needs the examples along dim 0 of every selected layer's input "
            "(a model that flattens batch and sequence before a linear layer cannot be factorised)"
        )
    on_factors(index, x.reshape(batch, -1, x.shape[-1]), grad.reshape(batch, -1, grad.shape[-1]))
    return None


def layer_gradients(
    model: nn.Module,
    layers: Sequence[LinearLayer],
    objective: Callable[[nn.Module, Any], Tensor],
    batch: Any,
) -> list[Tensor]:
    """Per-example gradients of each layer built from its factors: ``[B, d_out, in_dim]`` (fp32) per layer.

    Materialises G = Σ_t δ_t x̃_tᵀ; for tests, mask fitting and small layers (LoGra and FactGraSS never
    build it). Layers the loss does not depend on get zeros.
    """
    grads: list[Tensor | None] = [None] * len(layers)

    def add(i: int, x: Tensor, delta: Tensor) -> None:
        if layers[i].has_bias:
            x = torch.cat([x, x.new_ones(*x.shape[:2], 1)], dim=2)
        g = torch.bmm(delta.transpose(1, 2).to(torch.float32), x.to(torch.float32))
        grads[i] = g if grads[i] is None else grads[i] + g

    values = capture_factors(model, layers, objective, batch, add)
    b = values.shape[0]
    device = next((g.device for g in grads if g is not None), values.device)
    return [
        g if g is not None else torch.zeros(b, layer.out_dim, layer.in_dim, device=device)
        for g, layer in zip(grads, layers)
    ]
