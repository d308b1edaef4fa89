"""Chains and spec strings: ``dg.compressor(spec, in_dim, seed)`` builds the same map as composing by hand."""

from __future__ import annotations

import pytest
import torch

import dunegrass as dg
from dunegrass.compress import Chain, Gaussian, RandomMask, SparseJL, describe, parse_spec
from dunegrass.errors import DunegrassError
from dunegrass.seeding import derive_seed


def test_parse_spec():
    assert parse_spec("mask:16384>sjlt:4096,c=2") == [("mask", 16384, {}), ("sjlt", 4096, {"c": 2})]
    assert parse_spec(" gaussian:64 ") == [("gaussian", 64, {})]
    assert parse_spec("identity") == [("identity", None, {})]


def test_grass_spec_equals_hand_built_chain():
    x = torch.randn(4, 5000, generator=torch.Generator().manual_seed(0))
    c = dg.compressor("mask:1024>sjlt:256", 5000, seed=3)
    assert isinstance(c, Chain) and describe(c) == "mask:1024>sjlt:256" and (c.in_dim, c.out_dim) == (5000, 256)
    mask = RandomMask(5000, 1024, seed=derive_seed(3, 0))
    sjlt = SparseJL(1024, 256, seed=derive_seed(3, 1))
    torch.testing.assert_close(c(x), sjlt(mask(x)))
    assert c.memory_bytes() == mask.memory_bytes() + sjlt.memory_bytes()


def test_single_stage_keeps_the_seed_and_options():
    g = dg.compressor("gaussian:32", 100, seed=5)
    assert isinstance(g, Gaussian) and torch.equal(g.matrix(), Gaussian(100, 32, seed=5).matrix())
    s = dg.compressor("sjlt:32,c=3,hash_mode=hashed", 100, seed=1)
    assert s.c == 3 and s.hash_mode == "hashed"


def test_chain_transpose_is_the_adjoint():
    c = dg.compressor("mask:300>sjlt:64", 1000, seed=2)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 1000, generator=gen), torch.randn(3, 64, generator=gen)
    torch.testing.assert_close((c(x) * y).sum(1), (x * c.transpose(y)).sum(1), rtol=1e-4, atol=1e-4)


def test_a_compressor_object_passes_through():
    s = SparseJL(100, 10)
    assert dg.compressor(s, 100) is s
    with pytest.raises(DunegrassError, match="dimension 100"):
        dg.compressor(s, 101)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("", "non-empty"),
        ("fourier:64", "unknown compressor 'fourier'"),
        ("sjlt", "needs an output size"),
        ("sjlt:abc", "positive integer"),
        ("sjlt:64,c", "name=value"),
        ("sjlt:64,q=2", "bad options"),
        ("sjlt:64,c=0", "c >= 1"),
        ("mask:50>sjlt:64", "larger than the input dimension 50"),
        ("sjlt:2000", "larger than the input dimension 1000"),
    ],
)
def test_bad_specs_get_clear_errors(spec, match):
    with pytest.raises(DunegrassError, match=match):
        dg.compressor(spec, 1000)


def test_chain_stages_must_fit():
    with pytest.raises(DunegrassError, match="do not fit"):
        Chain([RandomMask(100, 50), SparseJL(40, 10)])


def test_identity_keeps_the_gradient():
    x = torch.randn(2, 30, dtype=torch.float64)
    ident = dg.compressor("identity", 30)
    torch.testing.assert_close(ident(x), x.float())
    torch.testing.assert_close(ident(x.to_sparse()), x.float())
    with pytest.raises(DunegrassError, match="keeps the dimension"):
        dg.compressor("identity:10", 30)
