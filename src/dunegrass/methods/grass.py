"""GraSS: sparsify each per-example gradient with a mask, then SparseJL it (algorithms.md §2).

A preset of the gradient engine: the compressor is ``mask:k′>sjlt:k`` (``selective:k′>sjlt:k`` for a
learned mask), so compressing costs O(k′) per example, not O(d). The scores are those of the chosen
back end: block-eFIM influence (algorithms.md §1.1) or TRAK (§1.2: log-odds features, Q weights).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn

from ..compress import Chain, Compressor, SelectiveMask, SelectiveMaskConfig, compressor
from ..data import iterate_batches, subset, to_device
from ..errors import DunegrassError
from ..gradients import per_sample_gradients
from ..seeding import derive_seed
from ..task import Task
from .base import eval_mode
from .featurize import check_k, default_k, load_weights
from .gradient import GradientInfluence
from .mask_cache import load_masks, save_masks
from .presets import TRAK

BACKENDS = ("influence", "trak")
DEFAULT_K = 4096
MASKS = ("random", "selective")
MASK_FIT_BYTES = 2 << 30  # bound on the per-example gradients materialised to learn a selective mask
SHAPE = ("in_dim", "out_dim", "seed")  # what identifies a mask before it is learned


class GraSS(GradientInfluence):
    """GraSS (Hu et al. 2025): gradient → mask (k′ of d coordinates) → SparseJL (k′ → k) → influence.

    Args:
        k: features per example (the SparseJL output); default 4096, or the number of parameters
            when that is smaller (said once).
        mask: ``"random"`` (seeded) or ``"selective"`` — learned per checkpoint at the start of ``fit``
            on the per-example training gradients of ``mask_examples`` training examples (a seeded
            random subset), and saved under ``cache_dir``.
        mask_dim: k′, the coordinates kept (default 4k), capped at the gradient dimension d.
        backend: ``"influence"`` (block eFIM influence on the training loss; any Task) or ``"trak"``
            (TRAK scoring: log-odds features and Q weights; a ClassificationTask).
        c: non-zeros per coordinate of the SparseJL.
        mask_config: SelectiveMaskConfig for the selective fit.
        damping, checkpoints, params, batch_size, ...: as ``GradientInfluence``.

    Scores are ``[n_query, n_train]``, positive = proponent.
    """

    method_name = "grass"

    def __new__(cls, *args: Any, backend: str = "influence", **kwargs: Any):
        # dg.GraSS(..., backend="trak") is a GraSS that scores like TRAK: pick that class here so the
        # user calls one name whatever the back end.
        if cls is GraSS and backend == "trak":
            cls = GraSSTRAK
        return super().__new__(cls)

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        *,
        k: int | None = None,
        mask: str = "random",
        mask_dim: int | None = None,
        backend: str = "influence",
        c: int = 1,
        damping: float | None = 0.1,
        mask_examples: int = 512,
        mask_config: SelectiveMaskConfig | None = None,
        **kwargs: Any,
    ):
        if backend not in BACKENDS:
            raise DunegrassError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if mask not in MASKS:
            raise DunegrassError(f"mask must be one of {MASKS}, got {mask!r}")
        k = default_k(model, kwargs.get("params"), DEFAULT_K, "GraSS") if k is None else check_k(k)
        mask_dim = 4 * k if mask_dim is None else check_k(mask_dim, "mask_dim")
        if mask_dim < k:
            raise DunegrassError(f"GraSS needs 1 <= k <= mask_dim, got k = {k}, mask_dim = {mask_dim}")
        if mask == "selective" and mask_examples < 10:
            raise DunegrassError(
                f"a selective mask is learned from at least 10 examples, got mask_examples = {mask_examples}"
            )
        self.k, self.mask, self.mask_dim, self.c, self.backend = int(k), mask, int(mask_dim), int(c), backend
        self.mask_examples, self.mask_config = int(mask_examples), mask_config or SelectiveMaskConfig()
        self._mask_keys: dict[int, dict] = {}  # per checkpoint: what its selective masks were learned from
        super().__init__(model, task, compressor=self._compressor, damping=damping, **kwargs)
        d = self.featurizers[0].in_dim
        if self.k > d:  # blocks smaller than k keep their size, but k beyond the whole gradient is a mistake
            raise DunegrassError(
                f"GraSS: k = {self.k} is larger than the input dimension {d} (the selected parameters); choose k <= {d}"
            )
        if mask == "selective":
            self.method_name = f"{self.method_name}-selective"

    def _compressor(self, in_dim: int, seed: int) -> Compressor:
        """``mask:k′>sjlt:k`` for a gradient block of ``in_dim`` coordinates (k′ capped at in_dim)."""
        kept = min(self.mask_dim, in_dim)
        k = min(self.k, kept)  # a block smaller than k (a bias, per parameter) keeps its size
        if kept == in_dim:  # keeping every coordinate is no mask at all: nothing to copy or learn
            return compressor(f"identity>sjlt:{k},c={self.c}", in_dim, seed)
        name = "selective" if self.mask == "selective" else "mask"
        return compressor(f"{name}:{kept}>sjlt:{k},c={self.c}", in_dim, seed)

    def _prepare_checkpoint(
        self, m: int, state: Mapping[str, Tensor], data: Any, fingerprints: dict[str, str], root: str | None
    ) -> None:
        """Learn (or load) this checkpoint's selective masks before it is featurised."""
        if self.mask == "selective":
            start = time.perf_counter()
            self._fit_masks(m, state, data, fingerprints, None if root is None else os.path.join(root, "masks"))
            self.seconds["masks"] = (self.seconds.get("masks", 0.0) if m else 0.0) + time.perf_counter() - start

    def _fit_masks(
        self, m: int, state: Mapping[str, Tensor], data: Any, fingerprints: dict[str, str], path: str | None
    ) -> None:
        featurizer = self.featurizers[m]
        todo = [i for i, comp in enumerate(featurizer.compressors) if _selective(comp)]
        if not todo:
            return
        key = {
            "masks": "selective-v1",
            **fingerprints,
            "examples": self.mask_examples,
            "config": asdict(self.mask_config),
            "masks_shape": [{k: featurizer.compressors[i].stages[0].config()[k] for k in SHAPE} for i in todo],
            "signal": self.train_signal,
            "params": list(featurizer.params),
            "task": self.task.config(),
        }
        if self._mask_keys.get(m) == key:  # already learned on this data and these weights
            if path is not None and not os.path.exists(os.path.join(path, "key.json")):
                save_masks(path, key, {str(i): featurizer.compressors[i].stages[0] for i in todo})  # a new cache_dir
            return
        masks = load_masks(path, key, map(str, todo))
        if masks is None:
            grads = self._mask_gradients(m, state, data)
            masks = {}
            for i in todo:
                lo, hi = featurizer.in_blocks[i]
                masks[str(i)] = featurizer.compressors[i].stages[0].fit(grads[:, lo:hi], config=self.mask_config)
            save_masks(path, key, masks)
        for i in todo:
            featurizer.compressors[i].stages[0] = masks[str(i)]
        self._mask_keys[m] = key

    def _mask_gradients(self, m: int, state: Mapping[str, Tensor], data: Any) -> Tensor:
        """``[n_fit, d]``: per-example gradients of the training signal on a seeded random subset."""
        featurizer = self.featurizers[m]
        n_fit = min(self.mask_examples, len(data))
        if n_fit < 10:
            raise DunegrassError(f"a selective mask is learned from at least 10 training examples; there are {n_fit}")
        need = 4 * n_fit * featurizer.in_dim
        if need > MASK_FIT_BYTES:
            raise DunegrassError(
                f"learning a selective mask materialises {n_fit} per-example gradients of {featurizer.in_dim} "
                f"parameters ({need / 2**30:.1f} GiB); lower mask_examples, select fewer params, or use mask='random'"
            )
        gen = torch.Generator().manual_seed(derive_seed(self.seed, m, 0x6D61736B))
        chosen = subset(data, torch.randperm(len(data), generator=gen)[:n_fit])
        objective = self._objective(self.train_signal)
        parts = []
        with eval_mode(self.model), load_weights(self.model, state):
            for _, batch in iterate_batches(chosen, self.batch_size):
                batch = to_device(batch, self._device())
                parts.append(
                    per_sample_gradients(self.model, objective, batch, featurizer.params, featurizer.chunk_size)
                )
        return torch.cat(parts)

    def describe(self) -> dict:
        return {
            **super().describe(),
            "k": self.k,
            "mask": self.mask,
            "mask_dim": self.mask_dim,
            "backend": self.backend,
        }


class GraSSTRAK(GraSS, TRAK):
    """GraSS with TRAK scoring; what ``dg.GraSS(..., backend="trak")`` builds."""

    method_name = "grass-trak"


def _selective(comp: Compressor) -> bool:
    return isinstance(comp, Chain) and isinstance(comp.stages[0], SelectiveMask)
