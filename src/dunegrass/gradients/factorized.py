"""Factorised capture of layers that are linear maps of per-position inputs: x_t and δ_t, never the gradient.

A supported layer computes y_t = W x_t + b at positions t = 1…T of one example, so its per-example
gradient is G = Σ_t δ_t x̃_tᵀ (d_out × d_in, plus one column for the bias: x̃_t = [x_t; 1]), with
δ_t = ∂ℓ/∂y_t of that example's own loss (algorithms.md §2.1). Three layer types are such maps:

- ``nn.Linear``: x_t is the input at token t (T = 1 for a ``[B, d]`` input);
- Hugging Face's ``Conv1D`` (GPT-2): the same, weight stored transposed ``[d_in, d_out]``;
- ``nn.Conv2d`` with ``groups=1`` and ``padding_mode="zeros"`` (any stride, dilation, padding, including
  ``"same"``/``"valid"``): x_t is the input patch (C·kh·kw, as ``F.unfold`` lays it out) that output
  position t sees, δ_t the output gradient there, T = H_out·W_out; G reshapes to the weight's
  ``[O, C, kh, kw]``.

How: a forward hook on each selected layer keeps its input x and returns ``y + z``, where ``z`` is one
shared scalar zero that requires grad. ``torch.autograd.grad(Σ_b ℓ_b, z)`` then walks back through
every selected layer's output; a tensor hook on ``y + z`` receives δ as soon as it is complete and
hands (x, δ) as ``[B, T, d_in]``, ``[B, T, d_out]`` to a callback (the constant 1 of x̃ is left to the
consumer: appending it here would copy every layer input). Because only ``z`` is asked for, autograd
never computes a weight gradient (nor any gradient upstream of the first selected layer) and never
touches ``param.grad``; because the loss is a sum of per-example losses, δ is each example's own
gradient. Frozen layers work too (``z`` makes their outputs require grad). Padding needs no special
case: a position that no loss term depends on gets δ_t = 0 exactly. A layer called several times
contributes once per call (its gradients add up).

Memory: a Conv2d's patches are unfolded in the tensor hook, when δ arrives, not in the forward pass,
so the unfolded input — B × H_out·W_out × C·kh·kw elements, kh·kw/stride² times the layer's input —
exists for one layer at a time, while that layer is being compressed.
"""

from __future__ import annotations

import fnmatch
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DunegrassError
from ..notices import notice_once
from .per_sample import check_finite

ModuleSelection = str | type | Sequence[str | type] | None
FactorCallback = Callable[[int, Tensor, Tensor], None]  # (layer index, x [B, T, d_in], δ [B, T, d_out])
KINDS = "nn.Linear, nn.Conv2d (groups=1, padding_mode='zeros') and transformers' Conv1D"
MATERIALISED = "use dg.GradientInfluence / GraSS (materialised gradients) for other layers"


def supported_types() -> tuple[type, ...]:
    """``nn.Linear``, ``nn.Conv2d`` and, once transformers is imported, its Conv1D."""
    types: tuple[type, ...] = (nn.Linear, nn.Conv2d)
    # A model holding a Conv1D has imported transformers already; never import it here (optional extra).
    hf = sys.modules.get("transformers.pytorch_utils")
    if hf is not None and hasattr(hf, "Conv1D"):
        types += (hf.Conv1D,)
    return types


@dataclass
class FactorLayer:
    """One selected layer. ``kind``: ``"linear"``, ``"hf_conv1d"`` (weight ``[d_in, d_out]``) or ``"conv2d"``.

    ``in_features`` is d_in (C·kh·kw for a Conv2d), ``out_features`` d_out; ``in_dim`` counts the
    appended 1 when the bias is captured (``has_bias``).
    """

    name: str
    module: nn.Module
    in_features: int
    out_features: int
    has_bias: bool
    kind: str

    @property
    def label(self) -> str:
        """The name to show in a message (a model that is itself one layer has the empty name)."""
        return repr(self.name) if self.name else "(the model itself)"

    @property
    def in_dim(self) -> int:
        return self.in_features + int(self.has_bias)

    @property
    def out_dim(self) -> int:
        return self.out_features

    @property
    def transposed(self) -> bool:
        return self.kind == "hf_conv1d"

    def split_gradient(self, grad: Tensor) -> dict[str, Tensor]:
        """Map G ``[B, d_out, in_dim]`` to ``{"weight": ..., "bias": ...}`` shaped like the layer's parameters (+B)."""
        weight = grad[:, :, : self.in_features]
        if self.transposed:
            weight = weight.transpose(1, 2)
        elif self.kind == "conv2d":
            weight = weight.reshape(grad.shape[0], *self.module.weight.shape)
        out = {"weight": weight}
        if self.has_bias:
            out["bias"] = grad[:, :, self.in_features]
        return out

    def factors(self, x: Tensor, grad: Tensor, batch: int) -> tuple[Tensor, Tensor]:
        """The layer's input and output gradient as ``[B, T, d_in]`` and ``[B, T, d_out]``."""
        if self.kind == "conv2d":
            if x.ndim != 4 or x.shape[0] != batch or grad.shape[0] != batch:
                raise DunegrassError(
                    f"Conv2d layer {self.name!r} saw an input of shape {tuple(x.shape)} for a batch of {batch} "
                    "examples; factorised capture needs batched [B, C, H, W] inputs with the examples along dim 0"
                )
            return conv_patches(self.module, x), grad.flatten(2).transpose(1, 2)
        if x.ndim < 2 or x.shape[0] != batch or grad.shape[:-1] != x.shape[:-1]:
            raise DunegrassError(
                f"layer {self.name!r} saw an input of shape {tuple(x.shape)} for a batch of {batch} examples; "
                "factorised capture needs the examples along dim 0 of every selected layer's input "
                "(a model that flattens batch and sequence before a linear layer cannot be factorised)"
            )
        return x.reshape(batch, -1, x.shape[-1]), grad.reshape(batch, -1, grad.shape[-1])


LinearLayer = FactorLayer  # the former name (dunegrass.gradients exported it)


def conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding of ``conv``, as ``F.pad`` takes it.

    ``"same"`` pads d·(k − 1) in all, the odd one on the right/bottom, as ``F.conv2d`` does.
    """
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        pad: list[int] = []
        for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation)):  # width first
            total = d * (k - 1)
            pad += [total // 2, total - total // 2]
        return (pad[0], pad[1], pad[2], pad[3])
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def conv_patches(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``[B, C, H, W] -> [B, H_out·W_out, C·kh·kw]``: the patch each output position sees (``F.unfold``
    transposed, in the order of the weight's ``[O, C, kh, kw]``), built as one contiguous copy."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    pad = conv_padding(conv)
    if any(pad):
        x = F.pad(x, pad)
    windows = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]  # a view
    b, c, ho, wo = windows.shape[:4]
    return windows.permute(0, 2, 3, 1, 4, 5).reshape(b, ho * wo, c * kh * kw)


def _describe(module: nn.Module, trainable_only: bool) -> FactorLayer | None:
    """The layer ``module`` is, or None when factorised capture does not support it.

    ``trainable_only``: capture the bias column only when the bias requires grad (default selection).
    """
    bias = getattr(module, "bias", None)
    has_bias = bias is not None and (bias.requires_grad or not trainable_only)
    if isinstance(module, nn.Linear):
        return FactorLayer("", module, module.in_features, module.out_features, has_bias, "linear")
    if isinstance(module, nn.Conv2d):
        if _unsupported_conv(module):
            return None
        c, (kh, kw) = module.in_channels, module.kernel_size
        return FactorLayer("", module, c * kh * kw, module.out_channels, has_bias, "conv2d")
    if isinstance(module, supported_types()):  # Conv1D: weight [nx, nf]
        nx, nf = module.weight.shape
        return FactorLayer("", module, int(nx), int(nf), has_bias, "hf_conv1d")
    return None


def _unsupported_conv(conv: nn.Conv2d) -> str:
    """Why factorised capture cannot take this Conv2d ('' when it can)."""
    if conv.groups != 1:
        return f"a grouped Conv2d (groups={conv.groups})"
    if conv.padding_mode != "zeros":
        return f"a Conv2d with padding_mode={conv.padding_mode!r}"
    return ""


def factor_layers(model: nn.Module, modules: ModuleSelection = None) -> list[FactorLayer]:
    """The layers to capture, in the model's module order.

    Trainable parameters by default; ``modules=`` to choose. ``modules=None`` selects every supported
    layer (``nn.Linear``, ``Conv1D``, ``nn.Conv2d`` with groups=1 and zero padding) whose weight
    requires grad, with its bias column only when the bias exists and requires grad — the rule of
    ``select_parameters`` for the materialised methods. It skips grouped/depthwise and non-zero-padded
    convolutions, layers whose weight another module shares (GPT-2's ``lm_head`` is tied to the token
    embedding: its captured gradient would be one use's share of the shared weight's gradient), and
    the ``out_proj`` of ``nn.MultiheadAttention``, which that module never calls.

    Otherwise ``modules`` holds names, ``fnmatch`` patterns (``"transformer.h.*.mlp.*"``) and types
    (``nn.Linear``), alone or in a list; the layers named are selected whole (weight and bias) whatever
    their ``requires_grad`` says. An exact name must be a supported layer; a pattern or type keeps the
    supported layers it matches and must match one.
    """
    named = dict(model.named_modules())
    default = modules is None
    supported = {n: layer for n, m in named.items() if (layer := _describe(m, default)) is not None}
    if default:
        shared = _shared_weights(model)
        # nn.MultiheadAttention calls F.linear on out_proj.weight, never the module: hooks cannot see it.
        unseen = {id(m.out_proj) for m in named.values() if isinstance(m, nn.MultiheadAttention)}
        usable = {
            n
            for n, layer in supported.items()
            if id(layer.module.weight) not in shared and id(layer.module) not in unseen
        }
        chosen = {n for n in usable if supported[n].module.weight.requires_grad}
        if not chosen and usable:
            raise DunegrassError(
                f"every supported layer of {type(model).__name__} is frozen (weight.requires_grad=False: "
                f"{_preview(usable)}); attribution covers trainable parameters by default. Name the layers to "
                "use in modules=[...] (selected whole, frozen or not)"
            )
        if not chosen and supported:
            raise DunegrassError(
                f"every {KINDS} layer of {type(model).__name__} shares its weight with another module "
                f"(tied: {', '.join(list(supported)[:4])}), so none is selected by default; name them in modules=[...]"
            )
    else:
        items = [modules] if isinstance(modules, (str, type)) else list(modules)
        if not items:
            raise DunegrassError("modules is empty; name at least one layer, or pass modules=None for all")
        chosen = set()
        for item in items:
            chosen |= _match(item, named, supported)
    if not chosen:
        raise DunegrassError(
            f"{type(model).__name__} has no layers factorised capture (LoGra, FactGraSS, K-FAC) supports: it needs "
            f"{KINDS}. {MATERIALISED[0].upper()}{MATERIALISED[1:]}."
        )
    layers = []
    for name in named:  # module order, so features are laid out the same way every time
        if name in chosen:
            layer = supported[name]
            layer.name = name
            layers.append(layer)
    if default:
        _say_what_is_left_out(model, layers)
    return layers


def _say_what_is_left_out(model: nn.Module, layers: list[FactorLayer]) -> None:
    """Trainable parameters that no selected layer captures (embeddings, norms, tied heads) are not attributed:
    say so once, so that a user comparing with a materialised method knows why the gradients differ."""
    covered = {id(layer.module.weight) for layer in layers}
    covered |= {id(layer.module.bias) for layer in layers if layer.has_bias}
    left = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
    frozen = [n for n, _ in left if _weight_is_frozen(model, n)]
    if frozen:  # a trainable bias beside a frozen weight: the layer is one factorised capture knows
        notice_once(
            f"factor-frozen-weight:{type(model).__name__}:{len(frozen)}",
            f"{len(frozen)} trainable bias{'es' if len(frozen) > 1 else ''} whose layer's weight is frozen "
            f"({_preview(frozen)}) {'are' if len(frozen) > 1 else 'is'} left out by the "
            "factorised methods (LoGra, FactGraSS, K-FAC), which capture a layer by its weight; name the layer in "
            "modules= to capture it whole (its frozen weight too), or attribute the biases with dg.GradientInfluence "
            "/ GraSS (materialised gradients)",
        )
        left = [(n, c) for n, c in left if n not in frozen]
    if left:
        notice_once(
            f"factor-left-out:{type(model).__name__}:{len(left)}",
            f"the factorised methods (LoGra, FactGraSS, K-FAC) capture {KINDS} only: {sum(c for _, c in left):,} "
            f"trainable parameters in {len(left)} other tensors ({_preview(n for n, _ in left)}) are left out; "
            f"{MATERIALISED}",
        )


def _weight_is_frozen(model: nn.Module, name: str) -> bool:
    """Whether ``name`` is the bias of a layer factorised capture supports whose weight is frozen."""
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    weight = getattr(module, "weight", None)
    frozen = leaf == "bias" and isinstance(weight, nn.Parameter) and not weight.requires_grad
    return frozen and _describe(module, False) is not None


linear_layers = factor_layers  # the former name (dunegrass.gradients exported it)


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters held by more than one module (tied weights)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, count in seen.items() if count > 1}


def _match(item: str | type, named: dict[str, nn.Module], supported: dict[str, FactorLayer]) -> set[str]:
    if isinstance(item, type):
        if not any(issubclass(item, t) or issubclass(t, item) for t in supported_types()):
            raise DunegrassError(
                f"layer type {item.__name__} is not supported by factorised capture (it handles {KINDS}); "
                f"{MATERIALISED}"
            )
        found = {n for n, layer in supported.items() if isinstance(layer.module, item)}
        if not found:
            raise DunegrassError(
                f"the model has no supported {item.__name__} layers (factorised capture handles {KINDS})"
            )
        return found
    if not isinstance(item, str):
        raise DunegrassError(f"select layers by name, pattern or type; got {type(item).__name__}")
    if any(c in item for c in "*?["):
        found = {n for n in supported if fnmatch.fnmatchcase(n, item)}
        if not found:
            raise DunegrassError(
                f"the pattern {item!r} matches no {KINDS} layer; supported layers are: {_preview(supported)}"
            )
        return found
    if item not in named:
        raise DunegrassError(f"the model has no module named {item!r}; supported layers are: {_preview(supported)}")
    if item not in supported:
        module = named[item]
        what = (_unsupported_conv(module) if isinstance(module, nn.Conv2d) else "") or f"a {type(module).__name__}"
        raise DunegrassError(
            f"module {item!r} is {what}; factorised capture supports {KINDS} only. "
            f"Select supported layers, or {MATERIALISED}."
        )
    return {item}


def _preview(names) -> str:
    names = ["'' (the model itself)" if n == "" else n for n in names]
    return ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") if names else "(none)"


def capture_factors(
    model: nn.Module,
    layers: Sequence[FactorLayer],
    objective: Callable[[nn.Module, Any], Tensor],
    batch: Any,
    on_factors: FactorCallback,
) -> Tensor:
    """Run ``objective(model, batch) -> [B]`` once and hand each layer's (x, δ) to ``on_factors``.

    ``on_factors(i, inputs [B, T, d_in], grads [B, T, d_out])`` is called during the backward pass,
    once per call of layer ``layers[i]`` (for a linear layer T flattens any dimensions between batch and
    features, a ``[B, d]`` input has T = 1; for a Conv2d T = H_out·W_out and d_in = C·kh·kw, the unfolded
    patches, built just before the call and freed after it unless kept). δ is the gradient of Σ_b ℓ_b,
    i.e. of each example's own loss.
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
            idle = [layer.label for i, layer in enumerate(layers) if i not in ran]
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
    index: int, layer: FactorLayer, x: Tensor, version: int, grad: Tensor, state: dict, on_factors: FactorCallback
):
    if x._version != version:
        raise DunegrassError(
            f"the input of layer {layer.label} was modified in place after the layer ran, so its captured "
            "factor is no longer the input the layer saw; make that operation out of place"
        )
    inputs, grads = layer.factors(x, grad, state["batch"])  # a Conv2d's patches are unfolded here
    on_factors(index, inputs, grads)
    return None


def layer_gradients(
    model: nn.Module,
    layers: Sequence[FactorLayer],
    objective: Callable[[nn.Module, Any], Tensor],
    batch: Any,
) -> list[Tensor]:
    """Per-example gradients of each layer built from its factors: ``[B, d_out, in_dim]`` (fp32) per layer.

    Materialises G = Σ_t δ_t x̃_tᵀ; for tests, mask fitting and small layers (LoGra and FactGraSS never
    build it). ``layer.split_gradient`` reshapes it to the layer's parameters. Layers the loss does not
    depend on get zeros.
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
