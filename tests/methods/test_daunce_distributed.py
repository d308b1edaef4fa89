"""Daunce under torch.distributed: two gloo ranks split the members, each trained once, and give
exactly the single-process scores (also for queries first seen after fit)."""

import json
import os
import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dunegrass as dg
from dunegrass.methods import daunce_backends
from dunegrass.methods.daunce import Daunce
from dunegrass.methods.daunce_objectives import draw_members

SETTINGS = {
    "finetune": {"num_models": 5, "trainer": "finetune", "steps": 4, "batch_size": 8},
    "ensemble": {"num_models": 6, "trainer": "ensemble", "steps": 4, "batch_size": 8, "max_members": 2},
}


def _setup():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(36, 5, generator=gen), torch.randint(0, 3, (36,), generator=gen)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    return model, (x[:30], y[:30]), (x[30:], y[30:])


def _run(name, cache):
    """Scores on queries passed to fit, and on queries first seen afterwards."""
    model, (x, y), (xq, yq) = _setup()
    daunce = Daunce(model, dg.ClassificationTask(), **SETTINGS[name])
    daunce.fit((x, y), queries=(xq[:3], yq[:3]), cache_dir=cache)
    return daunce.score((xq[:3], yq[:3])).values.numpy(), daunce.score((xq[3:], yq[3:])).values.numpy()


def _worker(rank, world, port, threads, root):
    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    trained = []
    for backend in (daunce_backends.FinetuneBackend, daunce_backends.EnsembleBackend):
        original = backend.train

        def counting(self, data, members, eps, _original=original):
            trained.extend(m.seed for m in members)
            return _original(self, data, members, eps)

        backend.train = counting
    try:
        for name in SETTINGS:
            trained.clear()
            known, later = _run(name, os.path.join(root, f"cache-{name}"))
            np.save(os.path.join(root, f"{name}-known-{rank}.npy"), known)
            np.save(os.path.join(root, f"{name}-later-{rank}.npy"), later)
            with open(os.path.join(root, f"{name}-trained-{rank}.json"), "w") as f:
                json.dump(trained, f)
        dist.barrier()  # no rank tears gloo down while its peer still talks to it
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_train_each_member_once_and_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), torch.get_num_threads(), str(tmp_path)), nprocs=2, join=True)
    for name, settings in SETTINGS.items():
        known, later = _run(name, None)
        for rank in range(2):
            np.testing.assert_array_equal(np.load(tmp_path / f"{name}-known-{rank}.npy"), known)
            np.testing.assert_array_equal(np.load(tmp_path / f"{name}-later-{rank}.npy"), later)
        per_rank = [json.loads((tmp_path / f"{name}-trained-{r}.json").read_text()) for r in range(2)]
        K = settings["num_models"]
        seeds = [m.seed for m in draw_members(30, K, 0.3, 0)]
        assert sorted(per_rank[0] + per_rank[1]) == sorted(seeds)  # every member trained exactly once
        group = settings.get("max_members", 1)
        assert per_rank[0] == [s for k, s in enumerate(seeds) if (k // group) % 2 == 0]  # round robin
        assert per_rank[1] and per_rank[0]
        weights = sorted(p.name for p in (tmp_path / f"cache-{name}" / "weights").glob("*.safetensors"))
        assert weights == [f"member-{k:05d}.safetensors" for k in range(K)]
