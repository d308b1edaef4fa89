"""Streamed scoring equals the direct sum over checkpoints, densely or as each query's top k."""

import numpy as np
import pytest
import torch

from dunegrass.influence import stream_scores
from dunegrass.scores import make_sink
from dunegrass.store import FeatureStore


def _store(features, shard=6):
    store = FeatureStore(None, {"t": 1}, features.shape[0], {"features": features.shape[1]}, shard)
    for i in store.missing():
        lo, hi = store.rows(i)
        store.write(i, {"features": features[lo:hi]})
    return store


@pytest.fixture
def two_checkpoints():
    gen = torch.Generator().manual_seed(0)
    train = [torch.randn(40, 9, generator=gen) for _ in range(2)]
    left = [torch.randn(5, 9, generator=gen) for _ in range(2)]
    scale = torch.rand(40, generator=gen)
    weights = [0.3, 0.7]
    want = sum(w * q @ t.T for w, q, t in zip(weights, left, train)) * scale
    return left, [_store(t.numpy()) for t in train], weights, scale, want


def test_dense_equals_the_direct_sum(device, two_checkpoints):
    left, stores, weights, scale, want = two_checkpoints
    sink = make_sink(5, 40, None)
    stream_scores([q.to(device) for q in left], stores, weights, sink, scale)
    torch.testing.assert_close(sink.result("m", {}).values, want, rtol=1e-5, atol=1e-5)


def test_top_k_equals_the_top_of_the_dense_matrix(device, two_checkpoints):
    left, stores, weights, scale, want = two_checkpoints
    sink = make_sink(5, 40, 4)
    stream_scores([q.to(device) for q in left], stores, weights, sink, scale)
    top = sink.result("m", {})
    vals, idx = torch.topk(want, 4, dim=1)
    np.testing.assert_array_equal(top.top().indices.numpy(), idx.numpy())
    torch.testing.assert_close(top.top().values, vals, rtol=1e-5, atol=1e-5)
    vals, idx = torch.topk(want, 4, dim=1, largest=False)
    np.testing.assert_array_equal(top.bottom().indices.numpy(), idx.numpy())
    assert top.n_train == 40 and top.top(2).indices.shape == (5, 2)
