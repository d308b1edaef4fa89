"""LoGra and FactGraSS: the gradient engine with factorised per-layer compression (algorithms.md §1.1, §2.1).

``FactorizedFeaturizer`` captures each selected layer's inputs and output gradients (``nn.Linear``,
transformers' ``Conv1D``, and ``nn.Conv2d`` as a linear map of its unfolded patches) during one
forward/backward pass and compresses them layer by layer, so neither the per-example gradient nor the
weight gradient is ever built. Each layer is one block of the block eFIM preconditioner. ``dg.LoGra`` and
``dg.FactGraSS`` are presets of ``GradientInfluence`` with this featurizer. Like every method, they
attribute through the trainable parameters by default (``modules=`` to choose; ``factor_layers``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn

from ..compress.factorized import (
    FactGraSSCompressor,
    FactorizedCompressor,
    FactorMaskConfig,
    LoGraCompressor,
    fit_factor_masks,
)
from ..data import iterate_batches, subset, to_device
from ..errors import DunegrassError, NonFiniteError
from ..gradients.factorized import FactorLayer, ModuleSelection, capture_factors, factor_layers, layer_gradients
from ..seeding import derive_seed
from ..task import Task
from .base import eval_mode
from .featurize import Featurizer, ObjectiveFn, load_weights
from .gradient import GradientInfluence
from .mask_cache import load_masks, save_masks

MASK_FIT_BYTES = 2 << 30  # bound on the materialised layer gradients used to learn selective masks


class FactorizedFeaturizer(Featurizer):
    """Features ``[B, Σ_l k_l]``: layer l's compressor applied to its captured factors; one block per layer."""

    def __init__(self, model: nn.Module, layers: Sequence[FactorLayer], compressors: Sequence[FactorizedCompressor]):
        if len(layers) != len(compressors) or not layers:
            raise DunegrassError("FactorizedFeaturizer needs one compressor per selected layer, and at least one")
        for layer, comp in zip(layers, compressors):
            if (comp.in_dim, comp.out_dim, comp.bias) != (layer.in_dim, layer.out_dim, layer.has_bias):
                raise DunegrassError(
                    f"the compressor for {layer.name!r} takes {comp.in_dim} -> {comp.out_dim} (bias={comp.bias}), "
                    f"the layer is {layer.in_dim} -> {layer.out_dim} (bias={layer.has_bias}; in_dim counts it)"
                )
        self.model, self.layers, self.compressors = model, list(layers), list(compressors)
        sizes = [c.k for c in self.compressors]
        self.blocks = [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(len(sizes))]

    def __call__(self, model: nn.Module, state: Mapping[str, Tensor], batch: Any, objective: ObjectiveFn) -> Tensor:
        if model is not self.model:
            raise DunegrassError("this featurizer was built for another model; build one per model")
        parts: list[Tensor | None] = [None] * len(self.layers)

        def compress(i: int, inputs: Tensor, grads: Tensor) -> None:
            phi = self.compressors[i](inputs, grads, check_finite=False)  # checked once below
            parts[i] = phi if parts[i] is None else parts[i] + phi  # a layer called twice: gradients add

        with load_weights(model, state):
            values = capture_factors(model, self.layers, objective, batch, compress)
        zeros = lambda k: torch.zeros(values.shape[0], k, device=values.device)  # noqa: E731  (layer unused by the loss)
        features = torch.cat([p if p is not None else zeros(c.k) for p, c in zip(parts, self.compressors)], dim=1)
        if not torch.isfinite(features).all():
            bad = [
                layer.name
                for layer, (lo, hi) in zip(self.layers, self.blocks)
                if not features[:, lo:hi].isfinite().all()
            ]
            raise NonFiniteError(f"the inputs or output gradients of layer(s) {', '.join(bad)} hold NaN or inf")
        return features

    def config(self) -> dict:
        return {
            "featurizer": "factorized",
            "layers": [[layer.name, layer.in_dim, layer.out_dim] for layer in self.layers],
            "compressors": [c.config() for c in self.compressors],
        }


def _reject(kwargs: dict, preset: str) -> None:
    for key in ("compressor", "params", "per_parameter", "featurizer"):
        if key in kwargs:
            raise DunegrassError(
                f"{preset} chooses layers with modules=... and builds its own compressors; drop {key}="
            )


class _FactorizedInfluence(GradientInfluence):
    """Shared wiring: one featurizer per checkpoint, each layer with its own seed."""

    def __init__(self, model, task, make: Callable[[FactorLayer, int], FactorizedCompressor], modules, **kwargs):
        _reject(kwargs, type(self).__name__)
        self.layers = factor_layers(model, modules)
        self._make = make
        seed = kwargs.get("seed", 0)
        n_ckpt = len(kwargs["checkpoints"]) if kwargs.get("checkpoints") is not None else 1
        featurizers = [self._featurizer(model, derive_seed(seed, m)) for m in range(max(n_ckpt, 1))]
        super().__init__(model, task, featurizer=featurizers[0], **kwargs)
        self.featurizers = featurizers[: len(self.checkpoints)]

    def _featurizer(self, model: nn.Module, seed: int) -> FactorizedFeaturizer:
        comps = [self._make(layer, derive_seed(seed, i)) for i, layer in enumerate(self.layers)]
        return FactorizedFeaturizer(model, self.layers, comps)


class LoGra(_FactorizedInfluence):
    """LoGra (Choe et al. 2024): per-layer (P_out ⊗ P_in) Gaussian projection of G, block eFIM influence.

    Args:
        k_in, k_out: factor sizes (default 64 × 64 = 4096 features per layer; capped at the layer's dims).
        modules: layers to use. Trainable parameters by default; modules= to choose: None selects every
            nn.Linear, Conv1D and nn.Conv2d (groups=1) whose weight requires grad, with its bias only when
            that requires grad; names, fnmatch patterns or types select those layers whole, frozen or not
            (``gradients.factorized.factor_layers``).
        damping: relative damping of each layer's Fisher block; None = gradient dot products.
        Other keyword arguments (checkpoints, batch_size, seed, train_signal, ...) as GradientInfluence.
    """

    method_name = "logra"

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        k_in: int = 64,
        k_out: int = 64,
        modules: ModuleSelection = None,
        damping: float | None = 0.1,
        **kwargs: Any,
    ):
        def make(layer: FactorLayer, seed: int) -> FactorizedCompressor:
            return LoGraCompressor(layer.in_dim, layer.out_dim, k_in, k_out, seed=seed, bias=layer.has_bias)

        super().__init__(model, task, make, modules, damping=damping, **kwargs)


class FactGraSS(_FactorizedInfluence):
    """FactGraSS (Hu et al. 2025): per-layer masks on both factors, then SparseJL to ``k``; block eFIM influence.

    Args:
        k: features per layer after SparseJL (default 4096).
        mask_in, mask_out: coordinates kept of each factor (default 128 × 128; capped at the layer's dims).
        masks: ``"random"`` (seeded) or ``"selective"`` — learned per layer and checkpoint by
            ``fit_factor_masks`` on the per-example layer gradients of ``mask_examples`` training
            examples (a seeded random subset), at the start of ``fit``; saved under ``cache_dir``.
        mask_config: FactorMaskConfig (search budget) for the selective fit.
        c: non-zeros per coordinate of the SparseJL.
        modules: trainable parameters by default; modules= to choose (as LoGra).
        damping and other keyword arguments as LoGra.
    """

    method_name = "factgrass"

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        k: int = 4096,
        mask_in: int = 128,
        mask_out: int = 128,
        masks: str = "random",
        modules: ModuleSelection = None,
        damping: float | None = 0.1,
        mask_examples: int = 256,
        mask_config: FactorMaskConfig | None = None,
        c: int = 1,
        **kwargs: Any,
    ):
        if masks not in ("random", "selective"):
            raise DunegrassError(f"masks must be 'random' or 'selective', got {masks!r}")
        self.masks, self.mask_examples, self.mask_config = masks, int(mask_examples), mask_config
        self.sizes = {"k": k, "mask_in": mask_in, "mask_out": mask_out, "c": c}

        def make(layer: FactorLayer, seed: int) -> FactorizedCompressor:
            return FactGraSSCompressor(
                layer.in_dim, layer.out_dim, k, mask_in, mask_out, seed=seed, c=c, bias=layer.has_bias
            )

        super().__init__(model, task, make, modules, damping=damping, **kwargs)
        if masks == "selective":
            self.method_name = "factgrass-selective"

    def _prepare_checkpoint(
        self, m: int, state: Mapping[str, Tensor], data: Any, fingerprints: dict[str, str], root: str | None
    ) -> None:
        """Learn (or load) this checkpoint's selective factor masks before it is featurised."""
        if self.masks == "selective":
            self._fit_masks(m, state, data, fingerprints, None if root is None else os.path.join(root, "masks"))

    def _fit_masks(
        self, m: int, state: Mapping[str, Tensor], data: Any, fingerprints: dict[str, str], path: str | None
    ) -> None:
        featurizer = self.featurizers[m]
        key = {
            "masks": "selective-factor-v1",
            **fingerprints,
            "examples": self.mask_examples,
            "config": asdict(self.mask_config or FactorMaskConfig()),
            "sizes": self.sizes,
            "signal": self.train_signal,
            "layers": [layer.name for layer in self.layers],
            "task": self.task.config(),
            "seed": self.seed,  # picks the examples the masks are learned from
        }
        names = [(f"{i}-out", f"{i}-in") for i in range(len(self.layers))]
        cached = load_masks(path, key, [name for pair in names for name in pair])
        if cached is None:
            grads = self._fit_gradients(state, data)
            fitted = [
                fit_factor_masks(g, self.sizes["mask_out"], self.sizes["mask_in"], comp.seed, self.mask_config)
                for g, comp in zip(grads, featurizer.compressors)
            ]
            save_masks(path, key, {name: mask for pair, masks in zip(names, fitted) for name, mask in zip(pair, masks)})
        else:
            fitted = [(cached[out], cached[inp]) for out, inp in names]
        featurizer.compressors = [
            FactGraSSCompressor(
                c.in_dim, c.out_dim, self.sizes["k"], mi, mo, seed=c.seed, c=self.sizes["c"], bias=c.bias
            )
            for c, (mo, mi) in zip(featurizer.compressors, fitted)
        ]

    def _fit_gradients(self, state: Mapping[str, Tensor], data: Any) -> list[Tensor]:
        """``[n_fit, d_out, in_dim]`` per layer: training-loss gradients of a seeded random subset."""
        n_fit = min(self.mask_examples, len(data))
        need = 4 * n_fit * sum(layer.out_dim * layer.in_dim for layer in self.layers)
        if need > MASK_FIT_BYTES:
            raise DunegrassError(
                f"learning selective masks materialises {n_fit} per-example gradients of the selected layers "
                f"({need / 2**30:.1f} GiB); lower mask_examples, select fewer modules, or use masks='random'"
            )
        gen = torch.Generator().manual_seed(derive_seed(self.seed, 0x66697473))
        chosen = subset(data, torch.randperm(len(data), generator=gen)[:n_fit].sort().values)
        objective = self._objective(self.train_signal)
        parts: list[list[Tensor]] = [[] for _ in self.layers]
        with eval_mode(self.model), load_weights(self.model, state):
            for _, batch in iterate_batches(chosen, self.batch_size):
                grads = layer_gradients(self.model, self.layers, objective, to_device(batch, self._device()))
                for i, g in enumerate(grads):
                    parts[i].append(g.cpu())
        return [torch.cat(p) for p in parts]
