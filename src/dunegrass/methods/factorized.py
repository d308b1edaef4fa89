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
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn

from ..compress import SelectiveMask
from ..compress.factor_masks import FactorMaskConfig, fit_factor_masks
from ..compress.factorized import FactGraSSCompressor, FactorizedCompressor, LoGraCompressor
from ..data import iterate_batches, to_device
from ..errors import DunegrassError, NonFiniteError
from ..gradients.factorized import FactorLayer, ModuleSelection, capture_factors, factor_layers, layer_gradients
from ..options import choice, deprecated, positive_int
from ..seeding import derive_seed
from ..task import Task
from .base import eval_mode
from .featurize import Featurizer, ObjectiveFn, load_weights
from .gradient import GradientInfluence
from .mask_cache import check_fit_bytes, learned_masks, mask_examples


class FactorizedFeaturizer(Featurizer):
    """Features ``[B, Σ_l k_l]``: layer l's compressor applied to its captured factors; one block per layer."""

    def __init__(self, model: nn.Module, layers: Sequence[FactorLayer], compressors: Sequence[FactorizedCompressor]):
        if len(layers) != len(compressors) or not layers:
            raise DunegrassError("FactorizedFeaturizer needs one compressor per selected layer, and at least one")
        for layer, comp in zip(layers, compressors):
            if (comp.layer_in, comp.layer_out, comp.bias) != (layer.in_dim, layer.out_dim, layer.has_bias):
                raise DunegrassError(
                    f"the compressor for {layer.label} takes {comp.layer_in} -> {comp.layer_out} (bias={comp.bias}), "
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
    """Shared wiring: the selected layers, and one featurizer per checkpoint with a seed per layer."""

    def __init__(self, model: nn.Module, task: Task, modules: ModuleSelection, **kwargs: Any):
        _reject(kwargs, type(self).__name__)
        self.layers = factor_layers(model, modules)
        super().__init__(model, task, **kwargs)

    def _featurizer(self, m: int, compressor, params, per_parameter) -> FactorizedFeaturizer:
        seed = derive_seed(self.options.seed, m)
        comps = [self._make(layer, derive_seed(seed, i)) for i, layer in enumerate(self.layers)]
        return FactorizedFeaturizer(self.model, self.layers, comps)

    @abstractmethod
    def _make(self, layer: FactorLayer, seed: int) -> FactorizedCompressor:
        """Layer ``layer``'s compressor, seeded with ``seed``: each preset builds its own."""


class LoGra(_FactorizedInfluence):
    """LoGra (Choe et al. 2024): per-layer (P_out ⊗ P_in) Gaussian projection of G, block eFIM influence.

    Args:
        k_in, k_out: factor sizes (default 64 × 64 = 4096 features per layer; capped at the layer's dims).
        modules: layers to use. Trainable parameters by default; modules= to choose: None selects every
            nn.Linear, Conv1D and nn.Conv2d (groups=1) whose weight requires grad, with its bias only when
            that requires grad; names, fnmatch patterns or types select those layers whole, frozen or not
            (``gradients.factorized.factor_layers``).
        options, damping, checkpoints, batch_size, seed, train_signal, ...: as GradientInfluence.
    """

    method_name = "logra"

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        *,
        k_in: int = 64,
        k_out: int = 64,
        modules: ModuleSelection = None,
        **kwargs: Any,
    ):
        self.k_in, self.k_out = positive_int(k_in, "k_in"), positive_int(k_out, "k_out")
        super().__init__(model, task, modules, **kwargs)

    def _make(self, layer: FactorLayer, seed: int) -> FactorizedCompressor:
        return LoGraCompressor(layer.in_dim, layer.out_dim, self.k_in, self.k_out, seed=seed, bias=layer.has_bias)


class FactGraSS(_FactorizedInfluence):
    """FactGraSS (Hu et al. 2025): per-layer masks on both factors, then SparseJL to ``k``; block eFIM influence.

    Args:
        k: features per layer after SparseJL (default 4096).
        mask: ``"random"`` (seeded) or ``"selective"`` — learned per layer and checkpoint by
            ``fit_factor_masks`` on the per-example layer gradients of ``mask_examples`` training
            examples (a seeded random subset), at the start of ``fit``; saved under ``cache_dir``.
        mask_size: coordinates kept of each factor: one size for both (default 128), or
            ``(input side, output side)``; capped at the layer's dims.
        mask_config: FactorMaskConfig (search budget) for the selective fit.
        c: non-zeros per coordinate of the SparseJL.
        modules: trainable parameters by default; modules= to choose (as LoGra).
        options, damping and other keyword arguments as GradientInfluence.
    """

    method_name = "factgrass"

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        *,
        k: int = 4096,
        mask: str = "random",
        mask_size: int | tuple[int, int] = 128,
        modules: ModuleSelection = None,
        mask_examples: int = 256,
        mask_config: FactorMaskConfig | None = None,
        c: int = 1,
        **kwargs: Any,
    ):
        if "masks" in kwargs:
            deprecated("masks=", "mask=", "FactGraSS")
            mask = kwargs.pop("masks")
        mask_in, mask_out = (mask_size, mask_size) if isinstance(mask_size, int) else tuple(mask_size)
        for old in ("mask_in", "mask_out"):
            if old in kwargs:
                deprecated(f"{old}=", "mask_size=(input side, output side)", "FactGraSS")
        mask_in, mask_out = kwargs.pop("mask_in", mask_in), kwargs.pop("mask_out", mask_out)
        self.mask = choice(mask, ("random", "selective"), "mask")
        self.mask_examples, self.mask_config = positive_int(mask_examples, "mask_examples"), mask_config
        self.sizes = {
            "k": positive_int(k, "k"),
            "mask_in": positive_int(mask_in, "mask_size (input side)"),
            "mask_out": positive_int(mask_out, "mask_size (output side)"),
            "c": positive_int(c, "c"),
        }
        super().__init__(model, task, modules, **kwargs)
        if mask == "selective":
            self.method_name = "factgrass-selective"

    def _make(self, layer: FactorLayer, seed: int) -> FactorizedCompressor:
        z = self.sizes
        return FactGraSSCompressor(
            layer.in_dim, layer.out_dim, z["k"], z["mask_in"], z["mask_out"], seed=seed, c=z["c"], bias=layer.has_bias
        )

    def describe(self) -> dict:
        return {**super().describe(), **self.sizes, "mask": self.mask}

    def _prepare_checkpoint(
        self, m: int, state: Mapping[str, Tensor], data: Any, fingerprints: dict[str, str], root: str | None
    ) -> None:
        """Learn (or load) this checkpoint's selective factor masks before it is featurised."""
        if self.mask == "selective":
            self._fit_masks(m, state, data, fingerprints, None if root is None else os.path.join(root, "masks"))

    def _fit_masks(
        self, m: int, state: Mapping[str, Tensor], data: Any, fingerprints: dict[str, str], path: str | None
    ) -> None:
        featurizer = self.featurizers[m]
        n_fit = min(self.mask_examples, len(data))
        seed = derive_seed(self.options.seed, 0x66697473)
        chosen, digest = mask_examples(data, n_fit, seed, self.options.batch_size, sort=True)
        key = {
            "masks": "selective-factor-v1",
            **fingerprints,
            "examples_sha256": digest,
            "examples": self.mask_examples,
            "config": asdict(self.mask_config or FactorMaskConfig()),
            "sizes": self.sizes,
            "signal": self.options.train_signal,
            "layers": [layer.name for layer in self.layers],
            "task": self.task.config(),
            "seed": self.options.seed,  # picks the examples the masks are learned from
        }
        names = [(f"{i}-out", f"{i}-in") for i in range(len(self.layers))]

        def learn() -> dict[str, SelectiveMask]:
            grads = self._fit_gradients(state, chosen)
            z = self.sizes
            fitted = [
                fit_factor_masks(g, z["mask_out"], z["mask_in"], comp.seed, self.mask_config)
                for g, comp in zip(grads, featurizer.compressors)
            ]
            return {name: mask for pair, masks in zip(names, fitted) for name, mask in zip(pair, masks)}

        masks = learned_masks(path, key, [name for pair in names for name in pair], learn)
        featurizer.compressors = [
            FactGraSSCompressor(
                c.layer_in,
                c.layer_out,
                self.sizes["k"],
                masks[i_],
                masks[o_],
                seed=c.seed,
                c=self.sizes["c"],
                bias=c.bias,
            )
            for c, (o_, i_) in zip(featurizer.compressors, names)
        ]

    def _fit_gradients(self, state: Mapping[str, Tensor], chosen: Any) -> list[Tensor]:
        """``[n_fit, d_out, in_dim]`` per layer: training-loss gradients of the ``chosen`` examples, on the
        model's device."""
        check_fit_bytes(
            4 * len(chosen) * sum(layer.out_dim * layer.in_dim for layer in self.layers),
            f"{len(chosen)} per-example gradients of the selected layers",
            "lower mask_examples, select fewer modules, or use mask='random'",
        )
        objective = self._objective(self.options.train_signal)
        parts: list[list[Tensor]] = [[] for _ in self.layers]
        with eval_mode(self.model), load_weights(self.model, state):
            for _, batch in iterate_batches(chosen, self.options.batch_size):
                self.task.check_batch(batch, self._output_shape)
                grads = layer_gradients(self.model, self.layers, objective, to_device(batch, self._device()))
                for i, g in enumerate(grads):
                    parts[i].append(g)
        return [torch.cat(p) for p in parts]
