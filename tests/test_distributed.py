"""Two gloo ranks on CPU give the single-process features and scores, splitting the work between them:
training shards, Fisher blocks and queries."""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dunegrass as dg
from dunegrass.influence import BlockPreconditioner


def _setup():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 5, generator=gen), torch.randint(0, 3, (50,), generator=gen)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    return model, (x, y), (x[:7], y[:7])


def _method(model):
    # per-parameter blocks: 4 Fisher blocks to share between the ranks
    return dg.GradientInfluence(
        model, dg.ClassificationTask(), compressor="gaussian:16", per_parameter=True, shard_size=7
    )


def _worker(rank, world, store, cache, out):
    # a file store, not a TCP port: a port picked free can be taken before rank 0 binds it (a flaky abort)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    factored, scored = [], []
    original_factor, original_features = BlockPreconditioner._factor, dg.GradientInfluence.query_features
    BlockPreconditioner._factor = lambda self, i, g: factored.append(i) or original_factor(self, i, g)
    dg.GradientInfluence.query_features = lambda self, q, m=0, a=0, b=None: (
        scored.append((a, b)) or original_features(self, q, m, a, b)
    )
    try:
        model, train, queries = _setup()
        attr = _method(model).fit(train, cache_dir=cache)
        written = sorted(p for p in os.listdir(os.path.join(cache, "ckpt-0", "train")) if p.startswith("shard-"))
        np.save(os.path.join(out, f"scores-{rank}.npy"), attr.score(queries).values.numpy())
        top = attr.score(queries, top_k=3)
        np.save(os.path.join(out, f"top-{rank}.npy"), top.top().indices.numpy())
        np.save(os.path.join(out, f"shards-{rank}.npy"), np.array([len(written)]))
        np.save(os.path.join(out, f"factored-{rank}.npy"), np.array(factored))
        np.save(os.path.join(out, f"scored-{rank}.npy"), np.array(scored[:1]))
        dist.barrier()  # no rank tears gloo down while its peer still talks to it
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process_and_split_the_work(tmp_path):
    cache = tmp_path / "cache"
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(cache), str(tmp_path)), nprocs=2, join=True)
    model, train, queries = _setup()
    single = _method(model).fit(train)
    want = single.score(queries).values.numpy()
    for r in range(2):  # each rank scored part of the queries: equal up to float32 rounding of those GEMMs
        got = np.load(tmp_path / f"scores-{r}.npy")
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * abs(want).max())
        np.testing.assert_array_equal(np.load(tmp_path / f"top-{r}.npy"), single.score(queries).top(3).indices.numpy())
    assert int(np.load(tmp_path / "shards-0.npy")[0]) == 8  # both ranks see all 8 shards after the barrier
    # each rank wrote only its round-robin half: the shard files carry no duplicates
    assert len(list((cache / "ckpt-0" / "train").glob("features-*.npy"))) == 8
    # the 4 Fisher blocks (one group: they fit in memory) were factorised once, by one rank, and shared
    factored = [list(np.load(tmp_path / f"factored-{r}.npy")) for r in range(2)]
    assert sorted(factored[0] + factored[1]) == [0, 1, 2, 3]
    assert len(list(cache.glob("ckpt-0/fisher-*/block-*.npy"))) == 4
    # the 7 queries were split 3 + 4 between the ranks
    assert [tuple(np.load(tmp_path / f"scored-{r}.npy")[0]) for r in range(2)] == [(0, 3), (3, 7)]


def test_distributed_fit_needs_a_shared_cache(monkeypatch):
    from dunegrass import distributed

    monkeypatch.setattr(distributed, "active", lambda: True)
    model, train, _ = _setup()
    with pytest.raises(dg.DunegrassError, match="needs a cache_dir"):
        dg.GradientInfluence(model, dg.ClassificationTask()).fit(train)
