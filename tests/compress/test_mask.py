"""RandomMask: a seeded, uniform k′-subset applied as a gather."""

from __future__ import annotations

import pytest
import torch

from dunegrass.compress import RandomMask, random_subset
from dunegrass.compress import mask as mask_module
from dunegrass.errors import DunegrassError


def test_gather_of_a_seeded_sorted_subset():
    m = RandomMask(1000, 37, seed=4)
    idx = m.indices
    assert idx.numel() == 37 and idx.unique().numel() == 37 and torch.equal(idx, idx.sort().values)
    assert 0 <= int(idx.min()) and int(idx.max()) < 1000
    x = torch.randn(3, 1000, dtype=torch.float64)
    y = m(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, x[:, idx].float())  # no rescaling
    torch.testing.assert_close(m(x.to_sparse()), y)
    assert torch.equal(RandomMask(1000, 37, seed=4).indices, idx)
    assert not torch.equal(RandomMask(1000, 37, seed=5).indices, idx)


def test_subset_is_uniform():
    # Each of 20 coordinates is kept with probability 5/20 = 0.25; over 2000 seeds the frequency has a
    # standard deviation of about 0.01.
    counts = torch.zeros(20)
    for s in range(2000):
        counts[random_subset(20, 5, s)] += 1
    assert float((counts / 2000 - 0.25).abs().max()) < 0.04


def test_large_dimension_without_a_full_permutation(monkeypatch):
    monkeypatch.setattr(mask_module, "_RANDPERM_LIMIT", 1000)
    idx = random_subset(5000, 3000, seed=1)  # more than half: several rounds of draws
    assert idx.numel() == 3000 and idx.unique().numel() == 3000 and int(idx.max()) < 5000
    counts = torch.zeros(10)
    for s in range(600):
        counts[random_subset(10_000, 1, s) // 1000] += 1
    assert float(counts.min()) > 30  # every tenth of the range gets about 60 of 600 picks


def test_transpose_puts_values_back():
    m = RandomMask(50, 10, seed=0)
    y = torch.randn(2, 10)
    back = m.transpose(y)
    assert torch.equal(back[:, m.indices], y) and int((back != 0).sum()) == 20
    with pytest.raises(DunegrassError, match=r"\[B, 10\]"):
        m.transpose(torch.randn(2, 11))


def test_bad_sizes():
    with pytest.raises(DunegrassError, match="larger than the input dimension"):
        RandomMask(10, 11)
    with pytest.raises(DunegrassError, match=r"\[B, 10\]"):
        RandomMask(10, 3)(torch.randn(2, 9))


def test_sparse_coo_and_csr_inputs_equal_the_dense_one():
    x = torch.randn(5, 40) * (torch.rand(5, 40) < 0.2)
    m = RandomMask(40, 12, seed=3)
    for sparse in (x.to_sparse_coo(), x.to_sparse_csr()):
        torch.testing.assert_close(m(sparse), m(x), rtol=0, atol=0)
