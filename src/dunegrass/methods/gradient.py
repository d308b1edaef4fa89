"""GradientInfluence: the one gradient engine behind TRAK, TracIn, GraSS, LoGra, FactGraSS, exact IF.

fit: for each checkpoint, featurise the training set shard by shard into a FeatureStore (resumable),
then fit the block preconditioner (its inverted blocks kept beside the features). score: featurise
the queries a chunk at a time, precondition them, stream the training features and sum checkpoints
in place. Scores: Σ_l φ_{z,l}ᵀ (F_l + λ_l I)⁻¹ φ_{i,l}, positive = proponent (both sides
differentiate loss-like quantities; see algorithms.md §0).

Where things run: featurisation, compression, the Fisher and its solves and the scoring run on the
model's device; the host sees one transfer per shard of features (written to the store) and the
scores. Memory bounds: one shard of features (``store.shard_rows``: at most 256 MiB), one chunk of
per-example gradients (materialised methods), one group of Fisher blocks (1 GiB), one chunk of
query features (``QUERY_BYTES`` per checkpoint) and the scores themselves (dense, or
``n_query × top_k`` with ``top_k``).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import distributed
from ..data import as_data, iterate_batches, to_device
from ..errors import DunegrassError
from ..fingerprint import RowHasher, data_fingerprint, hashed_per_shard, model_fingerprint
from ..gradients import check_finite
from ..influence import BlockPreconditioner, check_fisher_memory, stream_scores
from ..influence.auto_damping import AUTO_RULE
from ..options import InfluenceOptions, build
from ..scores import Scores, TopScores, concat_scores, make_sink
from ..seeding import derive_seed
from ..store import BlockStore, FeatureStore, config_hash, shard_rows
from ..task import Task
from .base import Attributor, eval_mode
from .featurize import CompressorSpec, Featurizer, MaterializedFeaturizer, load_weights

QUERY_BYTES = 1 << 30  # query features held at once, per checkpoint: queries are scored in chunks of this


class GradientInfluence(Attributor):
    """Influence in a compressed gradient space with any compressor and a block eFIM preconditioner.

    Args:
        compressor: spec string (``"gaussian:4096"``, ``"mask:16384>sjlt:4096"``), a Compressor,
            a factory ``(in_dim, seed) -> Compressor``, or None/"identity" for raw gradients.
        options: ``InfluenceOptions`` (damping, train_signal, query_signal, batch_size, chunk_size,
            shard_size, store_dtype, fisher_dtype, seed); any of its fields may also be passed as a
            keyword, which overrides it. Presets: ``InfluenceOptions.preset("low_memory")``, ``"fast"``.
        params: parameter names to differentiate (default: all trainable).
        checkpoints: state dicts to average over (default: the model as it is). Each uses its own
            projection seed.
        checkpoint_weights: weights for combining checkpoints (default: the mean).
        per_parameter: compress each parameter tensor as its own block.
    """

    method_name = "gradient"

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        compressor: CompressorSpec = "identity",
        *,
        options: InfluenceOptions | None = None,
        params: Sequence[str] | None = None,
        checkpoints: Sequence[Mapping[str, Tensor]] | None = None,
        checkpoint_weights: Sequence[float] | None = None,
        per_parameter: bool = False,
        featurizer: Featurizer | None = None,
        progress: bool | None = None,
        **overrides: Any,
    ):
        super().__init__(model, task, progress)
        self.options = build(InfluenceOptions, options, overrides, type(self).__name__)
        self.checkpoints = list(checkpoints) if checkpoints is not None else [{}]
        if not self.checkpoints:
            raise DunegrassError("checkpoints is empty; pass at least one state dict or None for the model itself")
        if checkpoint_weights is None:
            checkpoint_weights = [1.0 / len(self.checkpoints)] * len(self.checkpoints)
        if len(checkpoint_weights) != len(self.checkpoints):
            raise DunegrassError("checkpoint_weights must have one weight per checkpoint")
        self.checkpoint_weights = [float(w) for w in checkpoint_weights]
        self.featurizers = [
            featurizer if featurizer is not None else self._featurizer(m, compressor, params, per_parameter)
            for m in range(len(self.checkpoints))
        ]
        check_fisher_memory(self.featurizers[0].blocks, self.options.damping)  # fail now, not after featurising
        self.stores: list[FeatureStore] = []
        self.preconditioners: list = []
        self.seconds: dict[str, float] = {}  # wall time of fit's steps: "featurize", "fisher" (GraSS: "masks")

    def _featurizer(self, m: int, compressor: CompressorSpec, params, per_parameter: bool) -> Featurizer:
        """Checkpoint ``m``'s featurizer (its own projection seed)."""
        seed = derive_seed(self.options.seed, m)
        return MaterializedFeaturizer(self.model, params, compressor, seed, self.options.chunk_size, per_parameter)

    # ---- objectives
    def _objective(self, signal: str):
        task = self.task
        if signal == "loss":
            return lambda model, batch: task.loss(task.outputs(model, batch), batch)
        return lambda model, batch: task.query_loss(task.outputs(model, batch), batch)

    def _extra_widths(self) -> dict[str, int]:
        """Per-example arrays stored beside the features (TRAK stores its Q weights)."""
        return {}

    def _extra_arrays(self, batch: Any) -> dict[str, Tensor]:
        """``{name: [B, width]}`` on the model's device, for the arrays of ``_extra_widths`` (the checkpoint's
        weights are loaded)."""
        return {}

    def config(self, m: int) -> dict:
        return {
            "method": self.method_name,
            "task": self.task.config(),
            "featurizer": self.featurizers[m].config(),
            "train_signal": self.options.train_signal,
            "checkpoint": m,
        }

    # ---- fit
    def fit(
        self, train: Any, *args: Any, queries: Any = None, cache_dir: str | os.PathLike | None = None
    ) -> GradientInfluence:
        """Featurise ``train`` and fit the preconditioner, per checkpoint (resumable from ``cache_dir``).
        ``queries`` are not needed here: they are featurised when they are scored."""
        _, cache_dir = self._fit_args(args, queries, cache_dir, ("cache_dir",))
        data = as_data(train)
        cache_dir = self._cache_dir(cache_dir)
        distributed.require_shared_cache(cache_dir)
        with eval_mode(self.model):
            self._preflight(data)
            self.train_data, self.n_train = data, len(data)
            # a dataset read lazily is hashed example by example as it is featurised (FeatureStore.check_data)
            fingerprint = data_fingerprint(data, read=False)
            self.stores, self.preconditioners = [], []
            for m, state in enumerate(self.checkpoints):
                fingerprints = {"data": fingerprint, "weights": self._weights_fingerprint(state)}
                root = None if cache_dir is None else os.path.join(os.fspath(cache_dir), f"ckpt-{m}")
                self._prepare_checkpoint(m, state, data, fingerprints, root)
                config = {**self.config(m), **fingerprints}
                path = None if root is None else os.path.join(root, "train")
                widths = {"features": self.featurizers[m].dim, **self._extra_widths()}
                dtypes = {"features": self.options.store_dtype}
                rows = shard_rows(4 * sum(widths.values()), self.options.shard_size)
                store = FeatureStore(path, config, self.n_train, widths, rows, dtypes)
                with _timed(self.seconds, "featurize", m):
                    self._featurize_into(store, m, state, data)
                self.stores.append(store)
                with _timed(self.seconds, "fisher", m):
                    self.preconditioners.append(self._fit_preconditioner(m, store, root))
        return self

    def _prepare_checkpoint(
        self, m: int, state: Mapping[str, Tensor], data: Any, fingerprints: dict[str, str], root: str | None
    ) -> None:
        """Hook run before checkpoint ``m`` is featurised, for state learned from the data at that checkpoint
        (GraSS's and FactGraSS's selective masks); ``fingerprints`` name the data and the weights, ``root``
        is the checkpoint's cache directory. Nothing by default."""

    def _preflight(self, data: Any, queries: bool = False) -> None:
        """One plain forward pass on two examples: shape/dtype errors surface with the real shapes (inside vmap
        they show one example's). For the training set, also the per-example output shape that every batch is
        checked against, and a finite loss; queries' labels are checked batch by batch as they are scored."""
        _, batch = next(iterate_batches(data, 2))
        batch = to_device(batch, self._device())
        with torch.no_grad():
            outputs = self.task.outputs(self.model, batch)
            if queries:
                return
            self._output_shape = outputs.shape[1:]
            self.task.check_batch(batch, self._output_shape)
            values = self.task.loss(outputs, batch)
        check_finite(values, "training loss")

    def _weights_fingerprint(self, state: Mapping[str, Tensor]) -> str:
        return model_fingerprint(self.model, state)

    def _featurize_into(self, store: FeatureStore, m: int, state: Mapping[str, Tensor], data: Any) -> None:
        """Featurise this rank's missing shards. A dataset the config's fingerprint does not cover (read lazily)
        is hashed example by example as it is read: featurised shards record the digest, complete ones are
        read again and checked against it, so a changed example is an error, never a stale score."""
        per_shard = hashed_per_shard(data)
        missing = set(store.missing())
        todo = distributed.my_shards([i for i in range(store.num_shards) if per_shard or i in missing])
        bar = tqdm(
            total=len(todo),
            desc=f"{self.method_name}: featurise (ckpt {m})",
            disable=not self.progress,
            unit="shard",
            leave=False,
        )
        with load_weights(self.model, state):  # the checkpoint, loaded once for all its batches
            for index in todo:
                lo, hi = store.rows(index)
                rows = RowHasher() if per_shard else None
                parts: dict[str, list[Tensor]] = {}
                for _, batch in iterate_batches(data, self.options.batch_size, lo, hi):
                    if rows is not None:
                        rows.update(batch)
                    if index not in missing:
                        continue
                    for name, arr in self._arrays(m, batch, self.options.train_signal, extras=True).items():
                        parts.setdefault(name, []).append(arr.detach())
                digest = None if rows is None else rows.hexdigest()
                if index in missing:  # one host transfer per shard (not per batch), in the store's dtype
                    arrays = {k: _to_host(torch.cat(v), store.dtype(k)) for k, v in parts.items()}
                    store.write(index, arrays, digest)
                else:
                    store.check_data(index, digest)
                bar.update(1)
        bar.close()
        distributed.barrier()  # every rank reads all shards next

    def _arrays(self, m: int, batch, signal: str, extras: bool) -> dict[str, Tensor]:
        """Features (and extras) of one batch under checkpoint ``m``, whose weights the caller has loaded."""
        self.task.check_batch(batch, self._output_shape)  # every batch, here where data can be inspected
        batch = to_device(batch, self._device())
        out = {"features": self.featurizers[m](self.model, {}, batch, self._objective(signal))}
        if extras:
            out.update(self._extra_arrays(batch))
        return out

    def _fisher_path(self, store: FeatureStore, root: str | None) -> str | None:
        if root is None:
            return None
        o = self.options
        # the data digest too: a store recomputed from changed lazy data has the same config hash
        key = {"store": store.manifest["config_hash"], "data": store.data_digest(), "damping": o.damping}
        key["dtype"] = o.fisher_dtype
        if o.damping == "auto":  # factors from an earlier "auto" rule (held-out likelihood) are not reused
            key["auto_rule"] = AUTO_RULE
        return os.path.join(root, f"fisher-{config_hash(key)[:16]}")

    def _fit_preconditioner(self, m: int, store: FeatureStore, root: str | None):
        dtype = getattr(torch, self.options.fisher_dtype)
        pre = BlockPreconditioner(self.featurizers[m].blocks, self.options.damping, dtype=dtype, device=self._device())
        path = self._fisher_path(store, root)
        return pre.fit(store, None if path is None else BlockStore(path))

    # ---- score
    def query_features(self, queries: Any, m: int = 0, start: int = 0, stop: int | None = None) -> Tensor:
        """``[n_query, k]`` features of queries ``[start, stop)`` under checkpoint ``m``, on the model's device."""
        self._require_fit()
        with eval_mode(self.model), load_weights(self.model, self.checkpoints[m]):
            if start == 0 and m == 0:  # once per scoring: the shapes do not depend on the checkpoint
                self._preflight(queries, queries=True)
            rows = [
                self._arrays(m, batch, self.options.query_signal, extras=False)["features"].detach()
                for _, batch in iterate_batches(queries, self.options.batch_size, start, stop)
            ]
        return torch.cat(rows)

    def _column_scale(self) -> Tensor | None:
        """Per-training-example factors ``[n_train]`` applied to every score column (TRAK's Q), or None."""
        return None

    def _query_chunk(self) -> int:
        return max(1, QUERY_BYTES // (4 * self.featurizers[0].dim))

    def score(self, queries: Any, top_k: int | None = None) -> Scores | TopScores:
        """Scores ``[n_query, n_train]`` on the host (positive = proponent), or with ``top_k`` each query's
        ``top_k`` largest and smallest (``TopScores``: memory ``n_query × top_k``, not ``× n_train``).

        Queries are featurised and scored a chunk at a time (``QUERY_BYTES`` of features per
        checkpoint); each chunk streams the training features once. Under ``torchrun`` each rank
        scores its contiguous share of the queries and every rank returns all of them.
        """
        queries = as_data(queries)
        lo, hi = distributed.my_rows(len(queries))
        parts = []
        with self._checked_once():
            scale = self._column_scale()
            for a in range(lo, hi, self._query_chunk()):
                b = min(a + self._query_chunk(), hi)
                left = [pre.solve(self.query_features(queries, m, a, b)) for m, pre in enumerate(self.preconditioners)]
                sink = make_sink(b - a, self.n_train, top_k)
                stream_scores(left, self.stores, self.checkpoint_weights, sink, scale)
                parts.append(sink.result(self.method_name, self.describe()))
        if not parts:  # a rank with no queries (fewer queries than ranks) still joins the gather
            parts.append(make_sink(0, self.n_train, top_k).result(self.method_name, self.describe()))
        return concat_scores(parts, gather=distributed.active(), device=self._device())

    def self_scores(self) -> Scores:
        """``Scores [1, n_train]``: each training example's influence on itself, φ_iᵀ (F + λI)⁻¹ φ_i."""
        self._require_fit()
        total = sum(
            w * p.self_influence(s) for w, s, p in zip(self.checkpoint_weights, self.stores, self.preconditioners)
        )
        scale = self._column_scale()
        return self._self_scores((total if scale is None else total * scale.to(total.device)).cpu())

    def describe(self) -> dict:
        return {
            "method": self.method_name,
            **self.options.to_dict(),
            "checkpoints": len(self.checkpoints),
            "featurizer": self.featurizers[0].config(),
        }


@contextlib.contextmanager
def _timed(seconds: dict[str, float], key: str, m: int) -> Iterator[None]:
    """Add the block's wall time to ``seconds[key]`` (reset at checkpoint 0, summed over checkpoints)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[key] = (seconds.get(key, 0.0) if m else 0.0) + time.perf_counter() - start


def _to_host(t: Tensor, dtype: str) -> np.ndarray:
    """``t`` as a host array in the store's dtype (cast on the device first: a smaller transfer)."""
    return t.to(getattr(torch, dtype)).cpu().numpy()
