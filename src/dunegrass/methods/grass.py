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
from ..data import iterate_batches, to_device
from ..errors import DunegrassError
from ..gradients import per_sample_gradients
from ..options import choice, deprecated, positive_int
from ..seeding import derive_seed
from ..task import Task
from .base import eval_mode
from .featurize import default_k, load_weights
from .gradient import GradientInfluence
from .mask_cache import check_fit_bytes, learned_masks, mask_examples
from .presets import TRAK

BACKENDS = ("influence", "trak")
DEFAULT_K = 4096
MASKS = ("random", "selective")
SHAPE = ("in_dim", "out_dim", "seed")  # what identifies a mask before it is learned


class GraSS(GradientInfluence):
    """GraSS (Hu et al. 2025): gradient → mask (k′ of d coordinates) → SparseJL (k′ → k) → influence.

    Args:
        k: features per example (the SparseJL output); default 4096, or the number of parameters
            when that is smaller (said once).
        mask: ``"random"`` (seeded) or ``"selective"`` — learned per checkpoint at the start of ``fit``
            on the per-example training gradients of ``mask_examples`` training examples (a seeded
            random subset), and saved under ``cache_dir``.
        mask_size: k′, the coordinates kept (default 4k), capped at the gradient dimension d.
        backend: ``"influence"`` (block eFIM influence on the training loss; any Task) or ``"trak"``
            (TRAK scoring: log-odds features and Q weights; a ClassificationTask).
        c: non-zeros per coordinate of the SparseJL.
        mask_config: SelectiveMaskConfig for the selective fit.
        options, damping, checkpoints, params, batch_size, ...: as ``GradientInfluence``.

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
        mask_size: int | None = None,
        backend: str = "influence",
        c: int = 1,
        mask_examples: int = 512,
        mask_config: SelectiveMaskConfig | None = None,
        **kwargs: Any,
    ):
        if "mask_dim" in kwargs:
            deprecated("mask_dim=", "mask_size=", "GraSS")
            mask_size = kwargs.pop("mask_dim")
        choice(backend, BACKENDS, "backend")
        choice(mask, MASKS, "mask")
        k = default_k(model, kwargs.get("params"), DEFAULT_K, "GraSS") if k is None else positive_int(k, "k")
        mask_size = 4 * k if mask_size is None else positive_int(mask_size, "mask_size")
        if mask_size < k:
            raise DunegrassError(f"GraSS needs k <= mask_size, got k = {k}, mask_size = {mask_size}")
        if mask == "selective" and positive_int(mask_examples, "mask_examples") < 10:
            raise DunegrassError(
                f"a selective mask is learned from at least 10 examples, got mask_examples = {mask_examples}"
            )
        self.k, self.mask, self.mask_size, self.c, self.backend = k, mask, mask_size, positive_int(c, "c"), backend
        self.mask_examples, self.mask_config = mask_examples, mask_config or SelectiveMaskConfig()
        self._mask_keys: dict[int, dict] = {}  # per checkpoint: what its selective masks were learned from
        super().__init__(model, task, compressor=self._compressor, **kwargs)
        d = self.featurizers[0].in_dim
        if self.k > d:  # blocks smaller than k keep their size, but k beyond the whole gradient is a mistake
            raise DunegrassError(
                f"GraSS: k = {self.k} is larger than the input dimension {d} (the selected parameters); choose k <= {d}"
            )
        if mask == "selective":
            self.method_name = f"{self.method_name}-selective"

    def _compressor(self, in_dim: int, seed: int) -> Compressor:
        """``mask:k′>sjlt:k`` for a gradient block of ``in_dim`` coordinates (k′ capped at in_dim)."""
        kept = min(self.mask_size, in_dim)
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
        chains = {i: comp for i, comp in enumerate(featurizer.compressors) if _selective(comp)}
        if not chains:
            return
        n_fit = min(self.mask_examples, len(data))
        if n_fit < 10:
            raise DunegrassError(f"a selective mask is learned from at least 10 training examples; there are {n_fit}")
        seed = derive_seed(self.options.seed, m, 0x6D61736B)
        chosen, digest = mask_examples(data, n_fit, seed, self.options.batch_size, sort=False)
        key = {
            "masks": "selective-v1",
            **fingerprints,
            "examples_sha256": digest,
            "examples": self.mask_examples,
            "config": asdict(self.mask_config),
            "masks_shape": [{k: c.head.config()[k] for k in SHAPE} for c in chains.values()],
            "signal": self.options.train_signal,
            "params": list(featurizer.params),
            "task": self.task.config(),
        }
        if self._mask_keys.get(m) == key and path is None:  # already learned on this data and these weights
            return

        def learn() -> dict[str, SelectiveMask]:
            if self._mask_keys.get(m) == key:  # learned in memory before: cache it in this new cache_dir
                return {str(i): c.head for i, c in chains.items()}
            grads = self._mask_gradients(m, state, chosen)
            return {
                str(i): c.head.fit(grads[:, slice(*featurizer.in_blocks[i])], config=self.mask_config)
                for i, c in chains.items()
            }

        masks = learned_masks(path, key, map(str, chains), learn)
        for i, chain in chains.items():
            featurizer.compressors[i] = chain.with_head(masks[str(i)])
        self._mask_keys[m] = key

    def _mask_gradients(self, m: int, state: Mapping[str, Tensor], chosen: Any) -> Tensor:
        """``[n_fit, d]``: per-example gradients of the training signal on the ``chosen`` examples."""
        featurizer = self.featurizers[m]
        n_fit = len(chosen)
        check_fit_bytes(
            4 * n_fit * featurizer.in_dim,
            f"{n_fit} per-example gradients of {featurizer.in_dim} parameters",
            "lower mask_examples, select fewer params, or use mask='random'",
        )
        objective = self._objective(self.options.train_signal)
        parts = []
        with eval_mode(self.model), load_weights(self.model, state):
            for _, batch in iterate_batches(chosen, self.options.batch_size):
                self.task.check_batch(batch, self._output_shape)
                batch = to_device(batch, self._device())
                grads = per_sample_gradients(self.model, objective, batch, featurizer.params, featurizer.chunk_size)
                parts.append(grads)
        return torch.cat(parts)

    def describe(self) -> dict:
        return {
            **super().describe(),
            "k": self.k,
            "mask": self.mask,
            "mask_size": self.mask_size,
            "backend": self.backend,
        }


class GraSSTRAK(GraSS, TRAK):
    """GraSS with TRAK scoring; what ``dg.GraSS(..., backend="trak")`` builds."""

    method_name = "grass-trak"


def _selective(comp: Compressor) -> bool:
    return isinstance(comp, Chain) and isinstance(comp.head, SelectiveMask)
