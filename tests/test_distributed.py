"""Two gloo ranks on CPU give exactly the single-process features and scores."""

import os
import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dunegrass as dg


def _setup():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 5, generator=gen), torch.randint(0, 3, (50,), generator=gen)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    return model, (x, y), (x[:6], y[:6])


def _worker(rank, world, port, cache, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, train, queries = _setup()
        attr = dg.GradientInfluence(model, dg.ClassificationTask(), compressor="gaussian:16", shard_size=7)
        attr.fit(train, cache_dir=cache)
        written = sorted(p for p in os.listdir(os.path.join(cache, "ckpt-0", "train")) if p.startswith("shard-"))
        scores = attr.score(queries).values.numpy()
        np.save(os.path.join(out, f"scores-{rank}.npy"), scores)
        np.save(os.path.join(out, f"shards-{rank}.npy"), np.array([len(written)]))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one_process(tmp_path):
    cache = tmp_path / "cache"
    mp.spawn(_worker, args=(2, _free_port(), str(cache), str(tmp_path)), nprocs=2, join=True)
    model, train, queries = _setup()
    single = dg.GradientInfluence(model, dg.ClassificationTask(), compressor="gaussian:16", shard_size=7)
    want = single.fit(train).score(queries).values.numpy()
    for r in range(2):  # each rank scored half of the queries: equal up to float32 rounding of those GEMMs
        np.testing.assert_allclose(np.load(tmp_path / f"scores-{r}.npy"), want, rtol=1e-5, atol=1e-5 * abs(want).max())
    assert int(np.load(tmp_path / "shards-0.npy")[0]) == 8  # both ranks see all 8 shards after the barrier
    # each rank wrote only its round-robin half: the shard files carry no duplicates
    assert len(list((cache / "ckpt-0" / "train").glob("features-*.npy"))) == 8


def test_distributed_fit_needs_a_shared_cache(monkeypatch):
    from dunegrass import distributed

    monkeypatch.setattr(distributed, "active", lambda: True)
    model, train, _ = _setup()
    import pytest

    with pytest.raises(dg.DunegrassError, match="needs a cache_dir"):
        dg.GradientInfluence(model, dg.ClassificationTask()).fit(train)
