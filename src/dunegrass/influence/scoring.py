"""Streamed scoring: scores[q, i] = Σ_m w_m · c_i · Σ_l ψ_{m,q,l}ᵀ φ_{m,i,l}, one chunk of training rows at a time.

ψ are the queries' preconditioned features under each checkpoint m (held: ``n_query × k`` per
checkpoint), φ the training features streamed from each checkpoint's store shard by shard, summed
over checkpoints in place, scaled per training example by ``c_i`` (TRAK's Q weights; 1 otherwise),
and handed to a sink (``scores.DenseSink`` or ``TopKSink``). Memory: the held queries, one shard per
checkpoint and one ``n_query × shard`` block — never ``n_query × n_train`` per checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import DunegrassError
from ..store.feature_store import FeatureStore


def stream_scores(
    left: Sequence[Tensor],
    stores: Sequence[FeatureStore],
    weights: Sequence[float],
    sink,
    column_scale: Tensor | None = None,
) -> None:
    """Feed ``sink.add(start, block [n_query, rows])`` for every shard of training rows.

    ``left[m]``: ``[n_query, k]`` preconditioned query features for checkpoint m (their device is where
    the products run); ``stores[m]``: that checkpoint's training features (same rows and shards);
    ``column_scale``: ``[n_train]`` per-example factors, or None.
    """
    if not (len(left) == len(stores) == len(weights)) or not left:
        raise DunegrassError("stream_scores needs one query block, store and weight per checkpoint")
    if len({(s.n, s.shard_size) for s in stores}) != 1:
        raise DunegrassError("the checkpoints' feature stores have different rows or shards")
    device = left[0].device
    readers = [s.iter_shards() for s in stores]
    for parts in zip(*readers):
        start = parts[0][0]
        block = None
        for (_, chunk), q, w in zip(parts, left, weights):
            product = q @ torch.from_numpy(chunk).to(device, torch.float32).T
            block = product.mul_(w) if block is None else block.add_(product, alpha=w)
        if column_scale is not None:
            block *= column_scale[start : start + block.shape[1]].to(device)
        sink.add(start, block)
