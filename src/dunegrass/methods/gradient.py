"""GradientInfluence: the one gradient engine behind TRAK, TracIn, GraSS, LoGra, FactGraSS, exact IF.

fit: for each checkpoint, featurise the training set shard by shard into a FeatureStore (resumable),
then fit the block preconditioner. score: featurise the queries, precondition, stream the training
features and combine checkpoints. Scores: Σ_l φ_{z,l}ᵀ (F_l + λ_l I)⁻¹ φ_{i,l}, positive = proponent
(both sides differentiate loss-like quantities; see algorithms.md §0).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import distributed
from ..data import as_data, iterate_batches, to_device
from ..errors import DunegrassError
from ..fingerprint import data_fingerprint, state_fingerprint
from ..gradients import check_finite
from ..influence import BlockPreconditioner, check_fisher_memory, pairwise_scores, self_influence
from ..scores import Scores
from ..seeding import derive_seed
from ..store import FeatureStore
from ..task import Task
from .base import Attributor
from .featurize import CompressorSpec, Featurizer, MaterializedFeaturizer

SIGNALS = ("loss", "measurement")


class GradientInfluence(Attributor):
    """Influence in a compressed gradient space with any compressor and a block eFIM preconditioner.

    Args:
        compressor: spec string (``"gaussian:4096"``, ``"mask:16384>sjlt:4096"``), a Compressor,
            a factory ``(in_dim, seed) -> Compressor``, or None/"identity" for raw gradients.
        damping: relative damping of the block Fisher (λ = damping · tr(F)/k); None = no
            preconditioner (gradient dot products).
        params: parameter names to differentiate (default: all trainable).
        checkpoints: state dicts to average over (default: the model as it is). Each uses its own
            projection seed.
        checkpoint_weights: weights for combining checkpoints (default: the mean).
        train_signal / query_signal: ``"loss"`` (the training loss) or ``"measurement"`` (the
            task's measurement in loss-like form).
        per_parameter: compress each parameter tensor as its own block.
    """

    method_name = "gradient"

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        compressor: CompressorSpec = "identity",
        damping: float | None = 0.1,
        params: Sequence[str] | None = None,
        checkpoints: Sequence[Mapping[str, Tensor]] | None = None,
        checkpoint_weights: Sequence[float] | None = None,
        train_signal: str = "loss",
        query_signal: str = "measurement",
        per_parameter: bool = False,
        batch_size: int = 64,
        chunk_size: int = 32,
        shard_size: int = 1024,
        store_dtype: str = "float32",
        seed: int = 0,
        progress: bool | None = None,
        featurizer: Featurizer | None = None,
    ):
        super().__init__(model, task, progress)
        for name, sig in (("train_signal", train_signal), ("query_signal", query_signal)):
            if sig not in SIGNALS:
                raise DunegrassError(f"{name} must be one of {SIGNALS}, got {sig!r}")
        if damping is not None and not damping > 0:
            raise DunegrassError(f"damping must be positive or None, got {damping}")
        self.checkpoints = list(checkpoints) if checkpoints is not None else [{}]
        if not self.checkpoints:
            raise DunegrassError("checkpoints is empty; pass at least one state dict or None for the model itself")
        if checkpoint_weights is None:
            checkpoint_weights = [1.0 / len(self.checkpoints)] * len(self.checkpoints)
        if len(checkpoint_weights) != len(self.checkpoints):
            raise DunegrassError("checkpoint_weights must have one weight per checkpoint")
        self.checkpoint_weights = [float(w) for w in checkpoint_weights]
        self.damping = damping
        self.train_signal, self.query_signal = train_signal, query_signal
        self.batch_size, self.shard_size, self.store_dtype = batch_size, shard_size, store_dtype
        self.seed = seed
        self.featurizers = [
            featurizer
            if featurizer is not None
            else MaterializedFeaturizer(model, params, compressor, derive_seed(seed, m), chunk_size, per_parameter)
            for m in range(len(self.checkpoints))
        ]
        check_fisher_memory(self.featurizers[0].blocks, damping)  # fail now, not after featurising
        self.stores: list[FeatureStore] = []
        self.preconditioners: list = []
        self.seconds: dict[str, float] = {}

    # ---- objectives
    def _objective(self, signal: str):
        task = self.task
        if signal == "loss":
            return lambda model, batch: task.loss(task.outputs(model, batch), batch)
        return lambda model, batch: task.query_loss(task.outputs(model, batch), batch)

    def _extra_widths(self) -> dict[str, int]:
        """Per-example arrays stored beside the features (TRAK stores its Q weights)."""
        return {}

    def _extra_arrays(self, state: Mapping[str, Tensor], batch: Any) -> dict[str, np.ndarray]:
        return {}

    def _device(self) -> torch.device:
        p = next(iter(self.model.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    def config(self, m: int) -> dict:
        return {
            "method": self.method_name,
            "task": self.task.config(),
            "featurizer": self.featurizers[m].config(),
            "train_signal": self.train_signal,
            "checkpoint": m,
        }

    # ---- fit
    def fit(self, train: Any, cache_dir: str | os.PathLike | None = None) -> GradientInfluence:
        data = as_data(train)
        distributed.require_shared_cache(cache_dir)
        self._preflight(data)
        self.train_data, self.n_train = data, len(data)
        fingerprint = data_fingerprint(data)
        was_training = self.model.training
        self.model.eval()
        self.stores, self.preconditioners = [], []
        try:
            for m, state in enumerate(self.checkpoints):
                fingerprints = {"data": fingerprint, "weights": self._weights_fingerprint(state)}
                root = None if cache_dir is None else os.path.join(os.fspath(cache_dir), f"ckpt-{m}")
                self._prepare_checkpoint(m, state, data, fingerprints, root)
                config = {**self.config(m), **fingerprints}
                path = None if root is None else os.path.join(root, "train")
                widths = {"features": self.featurizers[m].dim, **self._extra_widths()}
                dtypes = {"features": self.store_dtype}
                store = FeatureStore(path, config, self.n_train, widths, self.shard_size, dtypes)
                self._featurize_into(store, m, state, data)
                self.stores.append(store)
                self.preconditioners.append(self._fit_preconditioner(m, store))
        finally:
            self.model.train(was_training)
        return self

    def _prepare_checkpoint(
        self, m: int, state: Mapping[str, Tensor], data: Any, fingerprints: dict[str, str], root: str | None
    ) -> None:
        """Hook run before checkpoint ``m`` is featurised, for state learned from the data at that checkpoint
        (GraSS's and FactGraSS's selective masks); ``fingerprints`` name the data and the weights, ``root``
        is the checkpoint's cache directory. Nothing by default."""

    def _preflight(self, data: Any) -> None:
        """One plain forward pass on two examples: shape/dtype errors surface with the real shapes."""
        _, batch = next(iterate_batches(data, 2))
        with torch.no_grad():
            values = self.task.loss(self.task.outputs(self.model, to_device(batch, self._device())), batch)
        check_finite(values, "training loss")

    def _weights_fingerprint(self, state: Mapping[str, Tensor]) -> str:
        full = {**self.model.state_dict(), **dict(state)}
        return state_fingerprint(full)

    def _featurize_into(self, store: FeatureStore, m: int, state: Mapping[str, Tensor], data: Any) -> None:
        missing = distributed.my_shards(store.missing())
        bar = tqdm(
            total=len(missing),
            desc=f"{self.method_name}: featurise (ckpt {m})",
            disable=not self.progress,
            unit="shard",
            leave=False,
        )
        for index in missing:
            lo, hi = store.rows(index)
            parts: dict[str, list[np.ndarray]] = {}
            for _, batch in iterate_batches(data, self.batch_size, lo, hi):
                for name, arr in self._arrays(m, state, batch, self.train_signal, extras=True).items():
                    parts.setdefault(name, []).append(arr)
            store.write(index, {k: np.concatenate(v) for k, v in parts.items()})
            bar.update(1)
        bar.close()
        distributed.barrier()  # every rank reads all shards next

    def _arrays(self, m: int, state, batch, signal: str, extras: bool) -> dict[str, np.ndarray]:
        batch = to_device(batch, self._device())
        feats = self.featurizers[m](self.model, state, batch, self._objective(signal))
        out = {"features": feats.detach().cpu().numpy()}
        if extras:
            out.update(self._extra_arrays(state, batch))
        return out

    def _fit_preconditioner(self, m: int, store: FeatureStore):
        pre = BlockPreconditioner(self.featurizers[m].blocks, self.damping)
        return pre.fit(chunk for _, chunk in store.iter_shards())

    # ---- score
    def query_features(self, queries: Any, m: int = 0) -> Tensor:
        """``[n_query, k]`` features of the queries under checkpoint ``m``."""
        self._require_fit()
        state = self.checkpoints[m]
        was_training = self.model.training
        self.model.eval()
        try:
            rows = [
                self._arrays(m, state, batch, self.query_signal, extras=False)["features"]
                for _, batch in iterate_batches(queries, self.batch_size)
            ]
        finally:
            self.model.train(was_training)
        return torch.from_numpy(np.concatenate(rows))

    def _checkpoint_scores(self, queries: Any, m: int) -> Tensor:
        feats = self.query_features(queries, m)
        return pairwise_scores(feats, self.stores[m].iter_shards(), self.n_train, self.preconditioners[m])

    def _combine(self, per_checkpoint: list[Tensor]) -> Tensor:
        return sum(w * s for w, s in zip(self.checkpoint_weights, per_checkpoint))

    def score(self, queries: Any) -> Scores:
        self._require_fit()
        as_data(queries)
        values = self._combine([self._checkpoint_scores(queries, m) for m in range(len(self.checkpoints))])
        return Scores(values, method=self.method_name, meta=self.describe())

    def self_scores(self) -> Tensor:
        self._require_fit()
        return self._combine(
            [self_influence(s.iter_shards(), self.n_train, p) for s, p in zip(self.stores, self.preconditioners)]
        )

    def describe(self) -> dict:
        return {
            "method": self.method_name,
            "damping": self.damping,
            "checkpoints": len(self.checkpoints),
            "featurizer": self.featurizers[0].config(),
        }
