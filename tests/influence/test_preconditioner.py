"""Block eFIM preconditioner: equal to a direct float64 computation, whatever the memory budget, the
float32 solves or where the blocks live; blocks on disk resume and are checksummed."""

import numpy as np
import pytest
import torch

import dunegrass as dg
from dunegrass.influence import BlockPreconditioner
from dunegrass.store import BlockStore, FeatureStore

BLOCKS = [(0, 5), (5, 12), (12, 20)]


def _features(n=60, k=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-2, 1, k)  # a spread spectrum, as real gradients have
    return (torch.randn(n, k, generator=gen, dtype=torch.float64) * scale).numpy().astype(np.float32)


def _store(features, path=None, shard=7):
    store = FeatureStore(path, {"test": 1}, features.shape[0], {"features": features.shape[1]}, shard)
    for i in store.missing():
        lo, hi = store.rows(i)
        store.write(i, {"features": features[lo:hi]})
    return store


def _direct(features, queries, damping):
    phi = torch.from_numpy(features).double()
    out = torch.empty_like(queries, dtype=torch.float64)
    for a, b in BLOCKS:
        fisher = phi[:, a:b].T @ phi[:, a:b] / phi.shape[0]
        lam = damping * torch.trace(fisher) / (b - a)
        out[:, a:b] = torch.linalg.solve(
            fisher + lam * torch.eye(b - a, dtype=torch.float64), queries[:, a:b].T.double()
        ).T
    return out


@pytest.mark.parametrize("memory", [None, 5 * 5 * 4, 1])  # all blocks at once, one group per block, below one block
def test_solve_equals_direct_float64(device, memory):
    feats = _features()
    queries = torch.randn(4, 20, dtype=torch.float64)
    want = _direct(feats, queries, 0.1)
    pre = BlockPreconditioner(BLOCKS, 0.1, dtype=torch.float64, device=device, memory=memory).fit(_store(feats))
    got = pre.solve(queries.to(device)).cpu()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    if memory == 5 * 5 * 4:
        assert pre.groups == [[0], [1], [2]]


def test_float32_is_close_to_float64(device):
    feats = _features(n=500, k=20)
    queries = torch.randn(8, 20, dtype=torch.float64)
    want = _direct(feats, queries, 0.01)  # weak damping: a condition number in the thousands
    got = BlockPreconditioner(BLOCKS, 0.01, device=device).fit(_store(feats)).solve(queries.float().to(device))
    err = (got.cpu().double() - want).norm() / want.norm()
    assert err < 1e-4, f"float32 solves are off by {err:.2e} (relative)"


def test_self_influence_is_the_diagonal_of_the_pairwise_scores(device):
    feats = _features()
    pre = BlockPreconditioner(BLOCKS, 0.1, device=device, memory=7 * 7 * 4).fit(_store(feats))
    phi = torch.from_numpy(feats).to(device)
    want = (pre.solve(phi) * phi).sum(1).cpu()
    torch.testing.assert_close(pre.self_influence(_store(feats)).cpu(), want, rtol=1e-5, atol=1e-6)


def test_blocks_on_disk_are_reused_resumed_and_checksummed(tmp_path, monkeypatch):
    feats = _store(_features())
    first = BlockPreconditioner(BLOCKS, 0.1, memory=1).fit(feats, BlockStore(tmp_path / "fisher"))
    assert sorted(p.name for p in (tmp_path / "fisher").glob("block-*.npy")) == [
        "block-00000.npy",
        "block-00001.npy",
        "block-00002.npy",
    ]
    (tmp_path / "fisher" / "block-00001.json").unlink()  # as if killed before block 1 was recorded
    inverted = []
    original = BlockPreconditioner._factor
    monkeypatch.setattr(BlockPreconditioner, "_factor", lambda self, i, g: inverted.append(i) or original(self, i, g))
    again = BlockPreconditioner(BLOCKS, 0.1, memory=1).fit(feats, BlockStore(tmp_path / "fisher"))
    assert inverted == [1]
    q = torch.randn(3, 20)
    torch.testing.assert_close(again.solve(q), first.solve(q))
    raw = bytearray((tmp_path / "fisher" / "block-00002.npy").read_bytes())
    raw[-3] ^= 0xFF
    (tmp_path / "fisher" / "block-00002.npy").write_bytes(bytes(raw))
    with pytest.raises(dg.CorruptCacheError, match="block-00002.npy is corrupt"):
        BlockPreconditioner(BLOCKS, 0.1, memory=1).fit(feats, BlockStore(tmp_path / "fisher")).solve(q)


def test_blocks_that_do_not_fit_in_memory_go_to_a_temporary_directory():
    pre = BlockPreconditioner(BLOCKS, 0.1, memory=100).fit(_store(_features()))
    assert pre.factors.path is not None and pre._held is None
    path = pre.factors.path
    pre.solve(torch.randn(2, 20))
    import gc
    import os

    del pre
    gc.collect()
    assert not os.path.exists(path)  # removed with the preconditioner


def test_identity_without_damping():
    feats = _features()
    pre = BlockPreconditioner(BLOCKS, None).fit(_store(feats))
    q = torch.randn(2, 20)
    torch.testing.assert_close(pre.solve(q), q)
    torch.testing.assert_close(pre.self_influence(_store(feats)), torch.from_numpy(feats).square().sum(1))
