"""SparseJL: the map equals an independent NumPy reference of its hash, and it behaves like a JL transform."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dunegrass.compress import SparseJL, sjlt
from dunegrass.errors import DunegrassError, NonFiniteError
from dunegrass.seeding import derive_seed

M32 = np.uint64(0xFFFFFFFF)


def _np_hash32(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x21F0AAAD)) & M32
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x735A2D97)) & M32
    return x ^ (x >> np.uint64(15))


def numpy_sjlt(x: np.ndarray, k: int, seed: int, c: int) -> np.ndarray:
    """y_b = c^{-1/2} Σ_j Σ_r [h_r(j) = b] s_r(j) x_j with h, s from the keyed triple32 hash (float64)."""
    d = x.shape[1]
    j = np.arange(d, dtype=np.uint64)
    y = np.zeros((x.shape[0], k))
    for r in range(c):
        key = np.uint64(derive_seed(seed, r) & 0xFFFFFFFF)
        v = _np_hash32((_np_hash32(j) + key) & M32)
        bucket = ((v >> np.uint64(1)) * np.uint64(k)) >> np.uint64(31)
        sign = 1.0 - 2.0 * (v & np.uint64(1)).astype(np.float64)
        for row in range(x.shape[0]):
            np.add.at(y[row], bucket.astype(np.int64), sign * x[row])
    return y / math.sqrt(c)


@pytest.mark.parametrize("mode", ["stored", "hashed"])
@pytest.mark.parametrize("c", [1, 3])
def test_equals_numpy_reference(mode, c):
    x = torch.randn(5, 3001, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = SparseJL(3001, 97, seed=11, c=c, hash_mode=mode)
    ref = numpy_sjlt(x.numpy(), 97, 11, c)
    np.testing.assert_allclose(s(x.float()).numpy(), ref, rtol=1e-5, atol=1e-4)


def test_buckets_are_uniform_and_signs_balanced():
    s = SparseJL(200_000, 64, seed=3)
    buckets, signs = s.buckets_and_signs()
    counts = torch.bincount(buckets, minlength=64).double()
    expected = 200_000 / 64
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 120  # 63 degrees of freedom: p < 1e-5 above this
    assert abs(float(signs.mean())) < 0.01
    assert set(signs.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("c", [1, 2])
def test_norm_preserved_in_expectation(c):
    # E‖Sx‖² = ‖x‖² over the random map: average over 300 seeds. Var(‖Sx‖²/‖x‖²) ≈ 2/k, so the mean
    # of 300 draws has a standard deviation of about 0.01.
    x = torch.randn(1, 2000, generator=torch.Generator().manual_seed(0))
    ratios = torch.tensor([float(SparseJL(2000, 64, seed=s, c=c)(x).square().sum()) for s in range(300)])
    ratios /= float(x.square().sum())
    assert abs(float(ratios.mean()) - 1.0) < 0.05
    assert 0.5 * 2 / 64 < float(ratios.var()) < 2.0 * 2 / 64  # the spread a JL map of size 64 should have


def test_inner_products_within_jl_bounds():
    # 30 vectors, k = 2048: every pairwise inner product and norm within ε = 4·sqrt(2/k) ≈ 0.125 of
    # ‖x‖‖y‖ (a 4-sigma bound per pair; the largest of 465 pairs stays well inside it).
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(30, 50_000, generator=gen) * torch.rand(1, 50_000, generator=gen)  # uneven coordinates
    y = SparseJL(50_000, 2048, seed=9)(x)
    exact = x @ x.T
    norms = exact.diag().sqrt()
    err = ((y @ y.T) - exact).abs() / torch.outer(norms, norms)
    assert float(err.max()) < 4 * math.sqrt(2 / 2048)
    assert float(err.max()) > 0  # a projection, not the identity


def test_sparse_path_equals_dense_path():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 40_000, generator=gen) * (torch.rand(6, 40_000, generator=gen) < 0.01)
    for mode in ("stored", "hashed"):
        s = SparseJL(40_000, 300, seed=4, c=2, hash_mode=mode)
        dense = s.compress_dense(x)
        torch.testing.assert_close(s.compress_sparse(x.to_sparse()), dense, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s(x.to_sparse_csr()), dense, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s(x), dense, rtol=0, atol=0)


def test_same_map_for_any_batch_chunking_and_hash_mode(monkeypatch):
    # Small integers sum exactly in fp32, so "the same map" can be checked bit for bit.
    x = torch.randint(-8, 9, (9, 10_000), generator=torch.Generator().manual_seed(3)).float()
    stored = SparseJL(10_000, 128, seed=7, hash_mode="stored")
    full = stored(x)
    assert torch.equal(torch.cat([stored(x[i : i + 1]) for i in range(9)]), full)
    assert torch.equal(torch.cat([stored(x[:4]), stored(x[4:])]), full)
    monkeypatch.setattr(sjlt, "CHUNK", 777)
    assert torch.equal(stored(x), full)
    assert torch.equal(SparseJL(10_000, 128, seed=7, hash_mode="hashed")(x), full)
    assert not torch.equal(SparseJL(10_000, 128, seed=8)(x), full)  # another seed, another map


def test_low_precision_input_accumulates_in_fp32():
    x = torch.randn(4, 20_000, generator=torch.Generator().manual_seed(4))
    s = SparseJL(20_000, 256, seed=1)
    for dtype in (torch.float16, torch.bfloat16):
        low = x.to(dtype)
        y = s(low)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, s(low.float()), rtol=1e-6, atol=1e-5)


def test_transpose_is_the_adjoint():
    gen = torch.Generator().manual_seed(6)
    s = SparseJL(5000, 64, seed=2, c=3)
    x, y = torch.randn(3, 5000, generator=gen), torch.randn(3, 64, generator=gen)
    lhs = (s(x) * y).sum(1)
    rhs = (x * s.transpose(y)).sum(1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-3)


def test_hash_memory_is_compact_or_absent():
    assert SparseJL(100_000, 64, c=2).memory_bytes() == 4 * 2 * 100_000  # int32, sign folded in
    big = SparseJL(100_000, 64, max_hash_bytes=1000)
    assert big.hash_mode == "hashed" and big.memory_bytes() == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"in_dim": 10, "out_dim": 20}, "larger than the input dimension"),
        ({"in_dim": 100, "out_dim": 10, "c": 0}, "c >= 1"),
        ({"in_dim": 100, "out_dim": 10, "c": 1.5}, "c >= 1"),
        ({"in_dim": 100, "out_dim": 10, "hash_mode": "fast"}, "hash_mode"),
        ({"in_dim": 0, "out_dim": 10}, "positive"),
    ],
)
def test_bad_configuration_is_rejected(kwargs, match):
    with pytest.raises(DunegrassError, match=match):
        SparseJL(**kwargs)


def test_bad_input_is_rejected():
    s = SparseJL(100, 10)
    with pytest.raises(DunegrassError, match=r"\[B, 100\]"):
        s(torch.randn(4, 99))
    with pytest.raises(DunegrassError, match=r"\[B, 100\]"):
        s(torch.randn(100))
    with pytest.raises(DunegrassError, match="floating-point"):
        s(torch.ones(2, 100, dtype=torch.int64))
    x = torch.randn(2, 100)
    x[1, 17] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        s(x)
    with pytest.raises(DunegrassError, match=r"\[B, 10\]"):
        s.transpose(torch.randn(2, 11))
