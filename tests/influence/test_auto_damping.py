"""damping="auto": each block's relative damping chosen by held-out log-likelihood of its features."""

import numpy as np
import pytest
import torch

import dunegrass as dg
from dunegrass.influence import BlockPreconditioner
from dunegrass.influence.auto_damping import RATIOS, choose_ratio, held_out_log_likelihood
from dunegrass.store import FeatureStore

BLOCKS = [(0, 5), (5, 12), (12, 20)]


def _gaussian(n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen, dtype=torch.float64) * torch.logspace(-1, 1, k, dtype=torch.float64)


def _store(features: np.ndarray, shard: int):
    store = FeatureStore(None, {"test": 1}, features.shape[0], {"features": features.shape[1]}, shard)
    for i in store.missing():
        lo, hi = store.rows(i)
        store.write(i, {"features": features[lo:hi]})
    return store


def test_the_held_out_log_likelihood_is_the_gaussian_one():
    a, b = _gaussian(50, 6, seed=1), _gaussian(50, 6, seed=2)
    fa, fb = a.T @ a / 50, b.T @ b / 50
    lam = torch.tensor([0.3], dtype=torch.float64)
    want = -0.5 * (torch.logdet(fa + 0.3 * torch.eye(6, dtype=torch.float64)) + torch.trace(
        torch.linalg.solve(fa + 0.3 * torch.eye(6, dtype=torch.float64), fb)))  # fmt: skip
    torch.testing.assert_close(held_out_log_likelihood(fa, fb, lam)[0], want)


def test_fewer_examples_per_dimension_ask_for_more_damping():
    """A Fisher estimated from few examples in many dimensions needs more damping: the chosen ratio falls
    as n grows, and is small where the Fisher is well estimated."""
    k = 40
    chosen = []
    for n in (30, 120, 4000):
        x = _gaussian(n, k)
        even, odd = x[0::2], x[1::2]
        chosen.append(choose_ratio(even.T @ even, len(even), odd.T @ odd, len(odd)))
    assert chosen[0] > chosen[1] > chosen[2]
    assert chosen[2] <= 1e-2 and chosen[0] >= 0.1


def test_auto_solves_with_the_damping_it_chose_whatever_the_shards():
    x = _gaussian(90, 20, seed=3)
    feats = x.numpy().astype(np.float32)
    pres = [BlockPreconditioner(BLOCKS, "auto", dtype=torch.float64).fit(_store(feats, s)) for s in (7, 90)]
    assert pres[0].chosen == pres[1].chosen and set(pres[0].chosen) == {0, 1, 2}
    assert all(any(abs(r - float(c)) < 1e-12 for c in RATIOS) for r in pres[0].chosen.values())
    queries = torch.randn(3, 20, dtype=torch.float64)
    phi = torch.from_numpy(feats).double()
    want = torch.empty_like(queries)
    for i, (a, b) in enumerate(BLOCKS):
        fisher = phi[:, a:b].T @ phi[:, a:b] / 90
        lam = pres[0].chosen[i] * torch.trace(fisher) / (b - a)
        want[:, a:b] = torch.linalg.solve(fisher + lam * torch.eye(b - a, dtype=torch.float64), queries[:, a:b].T).T
    torch.testing.assert_close(pres[0].solve(queries), want.float(), rtol=1e-5, atol=1e-6)


def test_methods_take_auto_and_bad_values_get_a_clear_error(tiny_classification):
    model, train, queries = tiny_classification
    task = dg.ClassificationTask()
    auto = dg.GradientInfluence(model, task, compressor="sjlt:16", damping="auto").fit(train)
    (ratio,) = auto.preconditioners[0].chosen.values()
    fixed = dg.GradientInfluence(model, task, compressor="sjlt:16", damping=ratio).fit(train)
    torch.testing.assert_close(auto.score(queries).values, fixed.score(queries).values)
    with pytest.raises(dg.DunegrassError, match="'auto'"):
        dg.GradientInfluence(model, task, damping="automatic")
    with pytest.raises(dg.DunegrassError, match="'auto'"):
        dg.FactGraSS(model, task, damping=-1.0)
