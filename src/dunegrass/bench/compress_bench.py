"""Compression throughput: Gaussian, Rademacher, SparseJL, RandomMask and GraSS on batches of gradients.

    dunegrass bench compress [--quick] [--json FILE]

For every input dimension d, output size k and input density, each compressor maps the same
``[batch, d]`` fp32 batch (standard normal entries; at density 0.1 nine in ten set to exactly zero) to
``[batch, k]``. Every row is timed in this run, and its ratio to Gaussian is Gaussian's time on the
same (d, k, density) in this run divided by the row's. Building a compressor (drawing a cached
matrix, hashing coordinates) is timed apart as setup; a row's time is the median of repeated calls
after the first (the first alone when one call already takes longer than ``--min-time``).
``memory_bytes`` is what the compressor holds between calls; ``gb_per_s`` counts the input as dense
fp32 (batch · d · 4 bytes).

Besides the five methods: "SparseJL (hashed)" recomputes its hash from the seed on every call instead
of storing it (the mode used when d is too large to store 4 bytes per coordinate), and at density < 1
"SparseJL (COO)" gets the same batch as a sparse COO tensor (converted before timing), the path that
touches only the non-zeros.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from ..compress import Compressor, SparseJL, compressor, describe
from ..store.atomic import atomic_write_json

DIMS = (100_000, 1_000_000, 10_000_000)
KS = (1024, 4096)
DENSITIES = (1.0, 0.1)
METHODS = ("Gaussian", "Rademacher", "SparseJL", "SparseJL (hashed)", "SparseJL (COO)", "RandomMask", "GraSS")
SPARSE_INPUT = "SparseJL (COO)"  # the same batch handed over as a sparse COO tensor (converted untimed)
# --quick keeps the configuration the README quotes (d = 10⁶, k = 4096) and drops what costs most:
# Rademacher and the sparse input (their dense products take as long as Gaussian's).
QUICK = {
    "dims": (1_000_000,),
    "ks": (4096,),
    "densities": (1.0,),
    "methods": ("Gaussian", "SparseJL", "RandomMask", "GraSS"),
}


def build(method: str, d: int, k: int, seed: int) -> Compressor:
    """The compressor a row measures: ``[B, d] -> [B, k]``."""
    if method == "SparseJL (hashed)":
        return SparseJL(d, k, seed=seed, hash_mode="hashed")
    if method == SPARSE_INPUT:
        return SparseJL(d, k, seed=seed)
    spec = {
        "Gaussian": f"gaussian:{k}",
        "Rademacher": f"rademacher:{k}",
        "SparseJL": f"sjlt:{k}",
        "RandomMask": f"mask:{k}",
        "GraSS": f"mask:{min(4 * k, d)}>sjlt:{k}",
    }[method]
    return compressor(spec, d, seed=seed)


def make_input(batch: int, d: int, density: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, d, generator=gen)
    if density < 1.0:
        x.mul_(torch.rand(batch, d, generator=gen) < density)
    return x


def time_calls(fn: Callable[[], object], min_time: float, max_calls: int = 20) -> tuple[float, int]:
    """Median seconds per call after a warm-up call; the warm-up alone if it took ``min_time`` or more."""
    times = []
    while len(times) < max_calls and (not times or sum(times) < min_time):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return (statistics.median(times[1:]) if len(times) > 1 else times[0]), len(times)


def measure(method: str, x: torch.Tensor, k: int, density: float, min_time: float, seed: int) -> dict:
    d = x.shape[1]
    start = time.perf_counter()
    comp = build(method, d, k, seed)
    comp.prepare(x.device)
    setup = time.perf_counter() - start
    seconds, calls = time_calls(lambda: comp(x), min_time)
    row = {
        "method": method,
        "spec": describe(comp),
        "d": d,
        "k": k,
        "density": density,
        "seconds_per_batch": seconds,
        "examples_per_s": x.shape[0] / seconds,
        "gb_per_s": x.numel() * 4 / seconds / 1e9,
        "memory_bytes": comp.memory_bytes(),
        "setup_seconds": setup,
        "calls": calls,
    }
    return row


def run(
    dims=DIMS,
    ks=KS,
    densities=DENSITIES,
    methods=METHODS,
    batch: int = 64,
    min_time: float = 1.0,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Measure every (d, k, density, method); Gaussian first, so each row's ratio is from this run."""
    methods = ["Gaussian"] + [m for m in methods if m != "Gaussian"]
    rows = []
    for d in dims:
        for density in densities:
            x = make_input(batch, d, density, seed)
            coo = x.to_sparse().coalesce() if density < 1.0 and SPARSE_INPUT in methods else None
            for k in ks:
                if k > d:
                    continue
                base = None
                for method in methods:
                    if method == SPARSE_INPUT and coo is None:
                        continue  # a dense batch as a sparse tensor only costs more
                    row = measure(method, coo if method == SPARSE_INPUT else x, k, density, min_time, seed)
                    base = row["seconds_per_batch"] if method == "Gaussian" else base
                    row["ratio_vs_gaussian"] = base / row["seconds_per_batch"]
                    rows.append(row)
                    log(_line(row))
                    gc.collect()  # free a cached matrix before the next compressor builds its own
            del x, coo
            gc.collect()
    return rows


def _line(row: dict) -> str:
    return (
        f"{row['method']:<18} {row['d']:>9.0e} {row['k']:>5} {row['density']:>7.2f} "
        f"{row['seconds_per_batch']:>10.4g} {row['examples_per_s']:>10.4g} {row['gb_per_s']:>7.3g} "
        f"{row['ratio_vs_gaussian']:>10.4g} {row['memory_bytes'] / 2**20:>9.1f}"
    )


HEADER = (
    f"{'method':<18} {'d':>9} {'k':>5} {'density':>7} {'s/batch':>10} {'examples/s':>10} "
    f"{'GB/s':>7} {'x Gaussian':>10} {'MiB held':>9}"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--quick", action="store_true", help="d = 1e6, k = 4096, dense input only (under 30 s)")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the rows to FILE as JSON")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dims", type=int, nargs="+", default=None, help=f"input dimensions (default {DIMS})")
    parser.add_argument("--ks", type=int, nargs="+", default=None, help=f"output sizes (default {KS})")
    parser.add_argument("--densities", type=float, nargs="+", default=None, help=f"default {DENSITIES}")
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS, metavar="METHOD")
    parser.add_argument("--min-time", type=float, default=None, help="seconds of repeated calls per row")
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    grid = dict(QUICK) if args.quick else {"dims": DIMS, "ks": KS, "densities": DENSITIES, "methods": METHODS}
    for key in grid:
        if getattr(args, key) is not None:
            grid[key] = tuple(getattr(args, key))
    min_time = args.min_time if args.min_time is not None else (0.15 if args.quick else 1.0)
    start = time.perf_counter()
    print(f"compression throughput, batch {args.batch}, {torch.get_num_threads()} threads\n{HEADER}")
    rows = run(**grid, batch=args.batch, min_time=min_time, seed=args.seed)
    total = time.perf_counter() - start
    print(f"\n{len(rows)} rows in {total:.1f} s")
    if args.json:
        meta = {
            "benchmark": "compress",
            "quick": bool(args.quick),
            "batch": args.batch,
            "seconds": total,
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            },
            "rows": rows,
        }
        atomic_write_json(args.json, meta)
        print(f"wrote {args.json}")
    return 0
