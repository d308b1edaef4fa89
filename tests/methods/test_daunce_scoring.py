"""Daunce's covariance scores streamed chunk by chunk of training examples into a dense or top-k sink:
the same values and standard errors whatever the chunking, and top-k equal to the dense matrix's."""

import numpy as np
import pytest
import torch

import dunegrass as dg
from dunegrass.methods import covariance_scoring
from dunegrass.methods.blackbox import BlackBoxDaunce, LocalBackend
from dunegrass.methods.daunce import Daunce
from dunegrass.methods.daunce_objectives import CHUNK_BYTES, chunk_columns, covariance_into, covariance_scores
from dunegrass.scores import DenseSink, Scores, TopScores
from dunegrass.train import TrainConfig

SMALL = {"num_models": 6, "steps": 6, "train_batch_size": 8, "max_members": 3}


def _signals(K=30, n=23, nq=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(K, n, generator=gen, dtype=torch.float64)
    b = torch.randn(K, nq, generator=gen, dtype=torch.float64)
    b[:, 0] += a[:, 5]  # one clearly related pair
    return a, b


def _formula(a, b):
    """Sample covariance and the closed-form standard error of algorithms.md §3, pair by pair."""
    K = a.shape[0]
    ac, bc = a - a.mean(0), b - b.mean(0)
    values = np.cov(torch.cat([b, a], 1).T.numpy())[: b.shape[1], b.shape[1] :]
    out = np.zeros_like(values)
    for j in range(b.shape[1]):
        for i in range(a.shape[1]):
            x, y = bc[:, j].numpy(), ac[:, i].numpy()
            s_ab, s_a, s_b = values[j, i], (y * y).sum() / (K - 1), (x * x).sum() / (K - 1)
            mu22 = (x * x * y * y).mean()
            out[j, i] = np.sqrt(max(mu22 - s_ab**2, 0) / K + (s_a * s_b + s_ab**2) / (K * (K - 1)))
    return values, out


@pytest.mark.parametrize("m", [1, 4, 23, 100])
def test_streamed_covariance_equals_the_formula_for_any_chunk_size(m):
    a, b = _signals()
    sink = DenseSink(b.shape[1], a.shape[1], with_stderr=True)
    covariance_into(sink, ((s, a[:, s : s + m]) for s in range(0, a.shape[1], m)), b)
    values, stderr = _formula(a, b)
    np.testing.assert_allclose(sink.values.numpy(), values, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sink.stderr.numpy(), stderr, rtol=1e-5, atol=1e-7)
    whole = covariance_scores(a, b)
    torch.testing.assert_close(sink.values, whole[0], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(sink.stderr, whole[1], rtol=1e-6, atol=1e-8)


def test_a_chunk_is_bounded():
    for K, nq in [(2, 1), (32, 10), (1000, 5000), (10, 10**7)]:
        m = chunk_columns(K, nq)
        assert m >= 1
        assert m == 1 or 8 * m * (3 * K + 5 * nq) <= CHUNK_BYTES
    assert chunk_columns(32, 100) > 10_000  # a typical chunk covers many training examples


def test_chunking_does_not_change_daunce_scores(tiny_classification, monkeypatch):
    model, train, test = tiny_classification
    daunce = Daunce(model, dg.ClassificationTask(), **SMALL).fit(train, queries=test)
    whole = daunce.score(test)
    A, B = daunce.signals(test)
    reads = []
    original = daunce.store.train_chunks

    def spy(m):
        reads.append(m)
        return original(m)

    monkeypatch.setattr(covariance_scoring, "chunk_columns", lambda K, nq: 7)
    monkeypatch.setattr(daunce.store, "train_chunks", spy)
    chunked = daunce.score(test)
    assert reads == [7]  # 40 training examples in 6 chunks
    torch.testing.assert_close(chunked.values, whole.values, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(chunked.stderr, whole.stderr, rtol=1e-6, atol=1e-9)
    values, stderr = _formula(A, B)
    np.testing.assert_allclose(whole.values.numpy(), values, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(whole.stderr.numpy(), stderr, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(daunce.self_scores().values[0], A.var(0).float(), rtol=1e-5, atol=1e-12)


def _check_top_equals_dense(dense: Scores, top: TopScores, k: int):
    assert isinstance(top, TopScores) and top.n_train == dense.shape[1]
    for best, ranked in ((top.top(), dense.top(k)), (top.bottom(), dense.bottom(k))):
        torch.testing.assert_close(best.values, ranked.values, rtol=0, atol=0)
        torch.testing.assert_close(best.indices, ranked.indices, rtol=0, atol=0)
    torch.testing.assert_close(top.top_stderr, dense.stderr.gather(1, top.top_indices), rtol=0, atol=0)
    torch.testing.assert_close(top.bottom_stderr, dense.stderr.gather(1, top.bottom_indices), rtol=0, atol=0)


def test_top_k_equals_the_dense_matrix(tiny_classification, monkeypatch):
    model, train, test = tiny_classification
    daunce = Daunce(model, dg.ClassificationTask(), **SMALL).fit(train)
    dense = daunce.score(test)
    _check_top_equals_dense(dense, daunce.score(test, top_k=5), 5)
    monkeypatch.setattr(covariance_scoring, "chunk_columns", lambda K, nq: 3)  # top-k merged across chunks
    _check_top_equals_dense(daunce.score(test), daunce.score(test, top_k=5), 5)
    with pytest.raises(dg.DunegrassError, match="top_k"):
        daunce.score(test, top_k=0)


def test_blackbox_daunce_scores_top_k_too(tiny_classification):
    model, train, test = tiny_classification
    config = TrainConfig(optimizer="adam", lr=3e-3, steps=4, batch_size=8)
    attr = BlackBoxDaunce(LocalBackend(model, dg.ClassificationTask(), config), num_models=4, seed=1).fit(train)
    dense = attr.score(test)
    A, B = attr.signals(test)
    torch.testing.assert_close(dense.values, covariance_scores(A, B)[0], rtol=1e-6, atol=1e-9)
    _check_top_equals_dense(dense, attr.score(test, top_k=4), 4)


def test_normalize_scores_correlations_from_the_same_members(tiny_classification):
    """normalize=True: the Pearson correlation of the two signals across the members (a scoring setting: the same
    cache, the same members), standard errors scaled with the values."""
    model, train, queries = tiny_classification
    task = dg.ClassificationTask()
    cov = dg.Daunce(model, task, num_models=16).fit(train)
    cor = dg.Daunce(model, task, num_models=16, normalize=True).fit(train)
    A, B = cov.signals(queries)
    assert torch.equal(A, cor.signals(queries)[0])
    want = torch.corrcoef(torch.cat([B, A], 1).T)[: B.shape[1], B.shape[1] :]
    got, plain = cor.score(queries), cov.score(queries)
    torch.testing.assert_close(got.values.double(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.stderr / plain.stderr, got.values / plain.values, rtol=1e-3, atol=1e-4)
    assert cor.describe()["normalize"] is True
