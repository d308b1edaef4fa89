"""Dense JL projections: streamed and cached give the same map; entries have the right law; JL bounds."""

from __future__ import annotations

import math

import pytest
import torch

from dunegrass.compress import Gaussian, Rademacher, dense
from dunegrass.errors import DunegrassError, NonFiniteError


@pytest.mark.parametrize("cls", [Gaussian, Rademacher])
def test_streamed_equals_cached_and_blocks(cls, monkeypatch):
    monkeypatch.setattr(dense, "GROUP_BYTES", 3 * dense.BLOCK * 4 * 50)  # groups of 3 blocks
    x = torch.randint(-4, 5, (5, 7000), generator=torch.Generator().manual_seed(0)).float()
    cached, streamed = cls(7000, 50, seed=3), cls(7000, 50, seed=3, max_cache_bytes=0)
    assert cached.cached and not streamed.cached and streamed.group_rows == 3 * dense.BLOCK
    m = cached.matrix()
    torch.testing.assert_close(m[dense.BLOCK : 2 * dense.BLOCK], cached.block(1), rtol=0, atol=0)
    torch.testing.assert_close(streamed(x), x @ m, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cached(x), x @ m, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(torch.cat([streamed(x[:2]), streamed(x[2:])]), streamed(x), rtol=1e-5, atol=1e-3)
    assert not torch.equal(cls(7000, 50, seed=4).matrix(), m)


def test_entry_laws():
    g = Gaussian(4096, 256, seed=1).matrix()
    assert abs(float(g.mean())) < 0.002
    assert abs(float(g.var()) * 256 - 1.0) < 0.01
    assert abs(float((g * 16).pow(4).mean()) - 3.0) < 0.05  # Gaussian kurtosis
    r = Rademacher(4096, 256, seed=1).matrix()
    assert set((r * 16).round().unique().tolist()) == {-1.0, 1.0}
    assert abs(float(r.mean())) < 0.002


@pytest.mark.parametrize("cls", [Gaussian, Rademacher])
def test_inner_products_within_jl_bounds(cls):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(20, 3000, generator=gen)
    y = cls(3000, 1024, seed=2)(x)
    exact = x @ x.T
    norms = exact.diag().sqrt()
    err = ((y @ y.T) - exact).abs() / torch.outer(norms, norms)
    assert 0 < float(err.max()) < 4 * math.sqrt(2 / 1024)


@pytest.mark.parametrize("cached", [True, False])
def test_transpose_is_the_adjoint(cached):
    p = Gaussian(3000, 40, seed=5, max_cache_bytes=dense.DEFAULT_CACHE_BYTES if cached else 0)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 3000, generator=gen), torch.randn(3, 40, generator=gen)
    torch.testing.assert_close((p(x) * y).sum(1), (x * p.transpose(y)).sum(1), rtol=1e-4, atol=1e-3)


def test_low_precision_and_sparse_input():
    p = Gaussian(2000, 64, seed=0)
    x = torch.randn(3, 2000, generator=torch.Generator().manual_seed(2))
    assert p(x.half()).dtype == torch.float32
    torch.testing.assert_close(p(x.bfloat16()), p(x.bfloat16().float()))
    torch.testing.assert_close(p(x.to_sparse()), p(x))


def test_memory_is_bounded_when_streaming():
    p = Gaussian(10_000_000, 4096, seed=0)  # 164 GB as a matrix: never built
    assert not p.cached and p.memory_bytes() <= torch.get_num_threads() * (dense.GROUP_BYTES + dense.BLOCK * 4096 * 4)
    assert Gaussian(1000, 64).memory_bytes() == 1000 * 64 * 4


def test_bad_input():
    with pytest.raises(DunegrassError, match="larger than the input dimension"):
        Gaussian(10, 11)
    p = Rademacher(100, 10)
    with pytest.raises(DunegrassError, match=r"\[B, 100\]"):
        p(torch.randn(2, 101))
    with pytest.raises(NonFiniteError):
        p(torch.full((1, 100), float("inf")))
    with pytest.raises(DunegrassError, match="block 1 does not exist"):
        p.block(1)
