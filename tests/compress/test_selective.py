"""SelectiveMask: learns the coordinates that carry the inner-product structure; saved and loaded with its config."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import dunegrass as dg
from dunegrass.compress import RandomMask, SelectiveMask, SelectiveMaskConfig, mask_rank_agreement
from dunegrass.compress.factorized import FactGraSSCompressor
from dunegrass.errors import DunegrassError, NonFiniteError

D, INFORMATIVE = 2000, 40
QUICK = SelectiveMaskConfig(patience=3)  # the structure here is found within a few evaluations


def structured_gradients(n: int, seed: int) -> torch.Tensor:
    """``[n, D]``: 40 coordinates (at random places) driven by a rank-5 latent; the rest weak noise."""
    gen = torch.Generator().manual_seed(seed)
    where = torch.randperm(D, generator=torch.Generator().manual_seed(123))[:INFORMATIVE]
    loadings = torch.randn(INFORMATIVE, 5, generator=torch.Generator().manual_seed(321))
    g = 0.3 * torch.randn(n, D, generator=gen)
    g[:, where] += torch.randn(n, 5, generator=gen) @ loadings.T
    return g


@pytest.fixture(scope="module")
def fitted():
    return SelectiveMask(D, INFORMATIVE, seed=0).fit(structured_gradients(200, 0), config=QUICK)


def test_selective_beats_random_on_rank_agreement(fitted):
    train, queries = structured_gradients(200, 1), structured_gradients(40, 2)  # unseen examples
    selective = mask_rank_agreement(fitted.indices, train, queries)
    random = mask_rank_agreement(RandomMask(D, INFORMATIVE, seed=0).indices, train, queries)
    assert selective > 0.9 and random < 0.6, (selective, random)
    assert fitted.agreement(train, queries) == pytest.approx(selective)
    assert fitted.history and fitted.history[-1]["step"] < QUICK.max_steps  # stopped early


def test_stops_when_the_soft_agreement_falls_below_the_threshold():
    cfg = SelectiveMaskConfig(threshold=1.0, eval_every=50)  # any soft mask agrees less than perfectly
    m = SelectiveMask(D, INFORMATIVE, seed=0).fit(structured_gradients(100, 0), config=cfg)
    assert m.history[-1]["step"] == 1 and m.history[-1]["soft_agreement"] < 1.0
    assert m.indices.numel() == INFORMATIVE


def test_explicit_holdout_and_determinism():
    g = structured_gradients(120, 3)
    cfg = SelectiveMaskConfig(max_steps=10)
    a = SelectiveMask(D, 30, seed=1).fit(g[:100], holdout=g[100:], config=cfg)
    b = SelectiveMask(D, 30, seed=1).fit(g[:100], holdout=g[100:], config=cfg)
    assert torch.equal(a.indices, b.indices)


def test_save_load_and_spec(fitted, tmp_path):
    path = tmp_path / "mask"
    fitted.save(path)
    loaded = SelectiveMask.load(path)
    assert torch.equal(loaded.indices, fitted.indices)
    assert loaded.fit_config == fitted.fit_config and loaded.history == fitted.history
    assert loaded.config() == fitted.config() and "indices_sha256" in loaded.config()
    with open(path / "config.json") as f:
        assert json.load(f)["fit"]["lr"] == SelectiveMaskConfig().lr
    x = torch.randn(3, D)
    chain = dg.compressor(f"selective:{INFORMATIVE},path={path}>sjlt:16", D)
    torch.testing.assert_close(chain(x), chain.stages[1](x[:, fitted.indices]))
    with pytest.raises(DunegrassError, match="refit it"):
        dg.compressor(f"selective:{INFORMATIVE + 1},path={path}", D)


def test_corrupt_or_missing_files_are_reported(fitted, tmp_path):
    with pytest.raises(DunegrassError, match="cannot load"):
        SelectiveMask.load(tmp_path / "nothing")
    fitted.save(tmp_path / "m")
    other = np.sort(np.random.default_rng(0).choice(D, INFORMATIVE, replace=False)).astype(np.int64)
    np.save(os.path.join(tmp_path, "m", "indices.npy"), other)
    with pytest.raises(DunegrassError, match="corrupt"):
        SelectiveMask.load(tmp_path / "m")


def test_unfitted_and_bad_input():
    m = SelectiveMask(D, 10)
    with pytest.raises(DunegrassError, match="not been fitted"):
        m(torch.randn(2, D))
    with pytest.raises(DunegrassError, match="unfitted"):
        m.save("unused")
    assert m.memory_bytes() == 0
    with pytest.raises(DunegrassError, match="no coordinates yet"):
        m.transpose(torch.randn(2, 10))
    with pytest.raises(DunegrassError, match="no coordinates yet"):
        FactGraSSCompressor(D, 8, k=4, mask_in=m, mask_out=4)
    with pytest.raises(DunegrassError, match=rf"\[n, {D}\]"):
        m.fit(torch.randn(20, D - 1))
    with pytest.raises(DunegrassError, match="at least 10"):
        m.fit(torch.randn(5, D))
    bad = torch.randn(20, D)
    bad[3, 4] = float("nan")
    with pytest.raises(NonFiniteError):
        m.fit(bad)
    with pytest.raises(DunegrassError, match="lr"):
        m.fit(torch.randn(20, D), config=SelectiveMaskConfig(lr=0.0))
