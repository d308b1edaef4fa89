"""damping="auto": one relative damping for all blocks, r = Σ k / Σ min(n, k) (one block: mean nonzero eigenvalue)."""

import numpy as np
import pytest
import torch

import dunegrass as dg
from dunegrass.influence import BlockPreconditioner
from dunegrass.influence.auto_damping import auto_ratio
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


@pytest.mark.parametrize("n", [3, 6, 40])  # every block wider than n, some, none
def test_auto_is_one_ratio_for_all_blocks_the_dimensions_over_the_rank_the_examples_span(n):
    """A block wider than n has eigenvalues at zero; r = Σ k / Σ (nonzero eigenvalues), one r for all blocks."""
    x = _gaussian(n, 20, seed=n)
    pre = BlockPreconditioner(BLOCKS, "auto", dtype=torch.float64).fit(_store(x.numpy().astype(np.float32), 4))
    phi = torch.from_numpy(x.numpy().astype(np.float32)).double()
    rank = 0
    for a, b in BLOCKS:
        evals = torch.linalg.eigvalsh(phi[:, a:b].T @ phi[:, a:b] / n)
        rank += int((evals > 1e-9 * evals.max()).sum())
    assert rank == sum(min(n, b - a) for a, b in BLOCKS)
    assert list(pre.chosen.values()) == pytest.approx([20 / rank] * len(BLOCKS), rel=1e-12)
    assert len(pre.chosen) == len(BLOCKS)


def test_with_one_block_auto_damps_by_the_mean_of_the_nonzero_eigenvalues():
    n = 7
    x = _gaussian(n, 20, seed=1)
    pre = BlockPreconditioner([(0, 20)], "auto", dtype=torch.float64).fit(_store(x.numpy().astype(np.float32), 3))
    phi = torch.from_numpy(x.numpy().astype(np.float32)).double()
    evals = torch.linalg.eigvalsh(phi.T @ phi / n)
    nonzero = evals[evals > 1e-9 * evals.max()]
    assert len(nonzero) == n
    torch.testing.assert_close(pre.chosen[0] * evals.sum() / 20, nonzero.mean(), rtol=1e-9, atol=0)


def test_auto_ratio_checks_its_input():
    assert auto_ratio(500, [64, 1024, 10]) == (64 + 1024 + 10) / (64 + 500 + 10)
    with pytest.raises(dg.DunegrassError, match="k >= 1"):
        auto_ratio(10, [])
    with pytest.raises(dg.DunegrassError, match="n >= 1"):
        auto_ratio(0, [3])
    with pytest.raises(dg.DunegrassError, match="k >= 1"):
        auto_ratio(10, [3, 0])


def test_auto_solves_with_the_damping_it_chose_whatever_the_shards():
    x = _gaussian(6, 20, seed=3)
    feats = x.numpy().astype(np.float32)
    pres = [BlockPreconditioner(BLOCKS, "auto", dtype=torch.float64).fit(_store(feats, s)) for s in (4, 6)]
    assert pres[0].chosen == pres[1].chosen == dict.fromkeys(range(3), 20 / (5 + 6 + 6))  # Σ k / Σ min(n, k)
    queries = torch.randn(3, 20, dtype=torch.float64)
    phi = torch.from_numpy(feats).double()
    want = torch.empty_like(queries)
    for i, (a, b) in enumerate(BLOCKS):
        fisher = phi[:, a:b].T @ phi[:, a:b] / 6
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
    with pytest.raises(dg.DunegrassError, match="finite"):
        dg.LoGra(model, task, damping=float("inf"))
    with pytest.raises(dg.DunegrassError, match="did you mean 'auto'"):
        dg.GradientInfluence(model, task, damping="AUTO")
    assert dg.GradientInfluence(model, task, damping=np.float32(0.5)).options.damping == 0.5  # a NumPy scalar too


def test_factors_cached_under_another_auto_rule_are_not_reused(tiny_classification, tmp_path, monkeypatch):
    """The rule is part of the Fisher cache's key: a cache made under an earlier rule is refitted, not read."""
    import dunegrass.methods.gradient as gradient

    model, train, queries = tiny_classification
    make = lambda: dg.GradientInfluence(model, dg.ClassificationTask(), compressor="sjlt:16", damping="auto")  # noqa: E731
    monkeypatch.setattr(gradient, "AUTO_RULE", "an earlier rule")
    make().fit(train, cache_dir=tmp_path)
    monkeypatch.undo()
    now = make().fit(train, cache_dir=tmp_path).score(queries).values
    assert len(list(tmp_path.glob("ckpt-0/fisher-*"))) == 2
    torch.testing.assert_close(now, make().fit(train).score(queries).values)
