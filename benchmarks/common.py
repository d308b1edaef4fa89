"""Helpers shared by the benchmark scripts: timing, tables, JSON output, cached ground truth."""

from __future__ import annotations

import json
import os
import platform
import time

import torch

import dunegrass as dg
from dunegrass.bench.table import print_table  # noqa: F401  (the benchmarks import it from here)
from dunegrass.store import config_hash
from dunegrass.store.atomic import atomic_write_json

CACHE = os.environ.get("DUNEGRASS_BENCH_CACHE", os.path.join(os.path.dirname(__file__), "..", "runs", "bench-cache"))


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        return False


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }


def write_json(path: str, benchmark: str, rows: list[dict], **extra) -> None:
    atomic_write_json(path, {"benchmark": benchmark, "machine": machine(), **extra, "rows": rows})
    print(f"\nwrote {path}")


def ground_truth(bt, queries, num_subsets: int, num_seeds: int, seed: int = 0, tag: str = "") -> tuple:
    """Subset-retraining ground truth for a benchmark task, cached on disk by its settings — the training
    recipe included, so a task trained for another number of epochs does not read this one's."""
    os.makedirs(CACHE, exist_ok=True)
    recipe = config_hash(bt.train_config.to_dict())[:8]
    key = f"{bt.name}-{len(bt.train[0])}-{len(queries[0])}-{num_subsets}-{num_seeds}-{seed}-{recipe}{tag}"
    path = os.path.join(CACHE, f"gt-{key}.npz")
    if os.path.exists(path):
        gt = dg.GroundTruth.load(path)
        return gt, gt.config.get("seconds", float("nan"))
    with Timer() as t:
        gt = dg.subset_retraining(
            bt.model,
            bt.task,
            bt.train,
            queries,
            bt.train_config,
            num_subsets=num_subsets,
            num_seeds=num_seeds,
            seed=seed,
            progress=True,
        )
    gt.config["seconds"] = t.seconds
    gt.save(path)
    return gt, t.seconds


def quick_lm(finetune_epochs: float = 8.0) -> tuple:
    """The quick docstring-LM task fine-tuned for ``finetune_epochs``, its 50-subset ground truth (both cached
    under runs/lm), and the suffix that names a non-default fine-tune length (``""`` or ``"-e32"``)."""
    from dunegrass.bench.lm import lm_ground_truth, lm_task

    cache = os.path.join(os.path.dirname(__file__), "..", "runs", "lm")
    bench = lm_task(quick=True, cache_dir=cache, finetune_epochs=finetune_epochs)
    suffix = "" if finetune_epochs == 8.0 else f"-e{finetune_epochs:g}"
    gt = lm_ground_truth(bench, num_subsets=50, cache_path=os.path.join(cache, f"gt-quick-50{suffix}.npz"))
    return bench, gt, suffix


def load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
