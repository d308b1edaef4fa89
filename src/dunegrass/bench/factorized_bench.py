"""Factorised compression on a GPT-2-small-shaped model: LoGra vs FactGraSS vs materialised gradients → SparseJL.

``dunegrass bench factorized [--quick] [--json FILE]``

Model: ``GPT2Config()`` with random weights (124 M parameters, eager attention); the 4 linear layers
of every block (Conv1D; the tied output head is left out) are compressed to k = 4096 each:

- LoGra: Gaussian 64 × 64 factor projections;
- FactGraSS: random masks 128 × 128 on the factors, then SparseJL 16384 → 4096;
- materialised: per-example gradients of those layers (torch.func vmap), then SparseJL d_layer → 4096.

Measured on one batch of random tokens (default 4 × 512):

- compress_seconds: compressing every layer's captured factors (or, for the materialised row,
  SparseJL of the already-built per-example gradients), median of ``--repeats`` runs; as in
  FactorizedFeaturizer, without a NaN check per layer (it checks all features once per batch);
- tokens_per_s: end to end — forward, backward, compression and a write to an on-disk feature
  store — over ``--steps`` batches after one warm-up batch;
- peak_rss_mb: the largest resident set sampled (every 5 ms) while that method ran end to end,
  whole process (model weights included).

``ratio_vs_logra`` is tokens/s over LoGra's in the same run; ``compress_speedup_vs_logra`` is LoGra's
compress_seconds over the method's. ``--quick`` keeps GPT-2-small layer widths but uses 1 block,
a vocabulary of 8192 and 4 × 256 tokens (under a minute). ``--device cuda`` runs the model and the
compression on a GPU (timings wait for it; rows add ``peak_device_mb``); no GPU has run it yet, and
the README's figures are CPU figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import threading
import time

import torch

from ..compress import SparseJL
from ..compress.base import canonical_device
from ..compress.factorized import FactGraSSCompressor, LoGraCompressor
from ..errors import DunegrassError
from ..gradients import per_sample_gradients
from ..gradients.factorized import capture_factors, factor_layers
from ..seeding import derive_seed
from ..store import FeatureStore, atomic_write_json
from ..task import CausalLMTask
from .table import print_table

K = 4096


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="1 block, vocab 8192, 4 x 256 tokens (under a minute)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=None, help="tokens per example (default 512; 256 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="timed batches per method (default 2; 1 with --quick)")
    p.add_argument("--repeats", type=int, default=5, help="compression timings per method (median)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--skip-materialized", action="store_true", help="leave out the materialised-gradient row")
    p.add_argument("--device", default="cpu", help="where the model and compression run, e.g. cuda (default cpu)")


class PeakRSS:
    """Largest resident set size (MiB) of this process while the block runs, sampled every 5 ms."""

    def __enter__(self):
        self.peak, self._stop = _rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())
        return False


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build_model(n_layer: int, vocab: int, n_positions: int, n_embd: int = 768, seed: int = 0):
    """GPT-2 with random weights, eager attention, dropout off; n_embd = 768 is GPT-2 small (MLP 4 × n_embd)."""
    from ..hf import tiny_gpt2

    n_head = 12 if n_embd % 12 == 0 else 1
    return tiny_gpt2(
        vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head, seed=seed
    )


def _batches(n: int, batch: int, seq_len: int, vocab: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (batch, seq_len), generator=gen)} for _ in range(n)]


def _sync(device: torch.device) -> None:
    """Wait for queued accelerator work, so that a wall-clock interval covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up: first-call allocations and cached projection matrices are not compression
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class _Methods:
    """Per-layer compressors of the three methods for ``layers``."""

    def __init__(self, layers, seed: int = 0):
        self.layers = layers
        self.logra = [
            LoGraCompressor(la.in_dim, la.out_dim, 64, 64, seed=derive_seed(seed, i), bias=la.has_bias)
            for i, la in enumerate(layers)
        ]
        self.factgrass = [
            FactGraSSCompressor(la.in_dim, la.out_dim, K, 128, 128, seed=derive_seed(seed, i), bias=la.has_bias)
            for i, la in enumerate(layers)
        ]
        self.sjlt = [
            SparseJL(la.in_dim * la.out_dim, min(K, la.in_dim * la.out_dim), seed=derive_seed(seed, i))
            for i, la in enumerate(layers)
        ]


def compression_times(model, methods: _Methods, batch: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per layer for each method on the factors of one batch: ``{method: [seconds per layer]}``."""
    task = CausalLMTask()
    factors: list = [None] * len(methods.layers)

    def keep(i, x, d):
        factors[i] = (x, d)

    capture_factors(model, methods.layers, lambda m, b: task.loss(task.outputs(m, b), b), batch, keep)
    out: dict[str, list[float]] = {"logra": [], "factgrass": [], "materialized": []}
    device = factors[0][0].device
    for i, (x, d) in enumerate(factors):
        # check_finite=False as in FactorizedFeaturizer, which checks all layers' features once per batch
        out["logra"].append(_median_seconds(lambda i=i, x=x, d=d: methods.logra[i](x, d, False), repeats, device))
        out["factgrass"].append(
            _median_seconds(lambda i=i, x=x, d=d: methods.factgrass[i](x, d, False), repeats, device)
        )
        x1 = torch.cat([x, x.new_ones(*x.shape[:2], 1)], dim=2)  # GPT-2's layers all have a bias
        g = torch.bmm(d.transpose(1, 2), x1).reshape(x.shape[0], -1)  # the per-example gradient, built
        out["materialized"].append(_median_seconds(lambda i=i, g=g: methods.sjlt[i](g), repeats, device))
    return out


def _factorized_features(model, layers, comps, batch, objective):
    parts: list = [None] * len(layers)

    def compress(i, x, d):
        phi = comps[i](x, d)
        parts[i] = phi if parts[i] is None else parts[i] + phi

    capture_factors(model, layers, objective, batch, compress)
    return torch.cat(parts, dim=1)


def _materialized_features(model, layers, sjlts, batch, objective):
    names = [f"{la.name}.{p}" for la in layers for p in ("weight", "bias")]
    grads = per_sample_gradients(model, objective, batch, names, chunk_size=batch["input_ids"].shape[0])
    out, offset = [], 0
    for la, sjlt in zip(layers, sjlts):
        size = la.in_dim * la.out_dim
        out.append(sjlt(grads[:, offset : offset + size]))
        offset += size
    return torch.cat(out, dim=1)


def throughput(model, methods: _Methods, name: str, batches: list[dict]) -> dict:
    """Tokens/s (forward + backward + compression + store write) over ``batches[1:]``, and peak RSS
    (plus, on a GPU, the peak of memory allocated there)."""
    task = CausalLMTask()
    device = batches[0]["input_ids"].device

    def objective(m, b):
        return task.loss(task.outputs(m, b), b)

    if name == "materialized":
        featurize = lambda b: _materialized_features(model, methods.layers, methods.sjlt, b, objective)  # noqa: E731
        width = sum(c.out_dim for c in methods.sjlt)
    else:
        comps = getattr(methods, name)
        featurize = lambda b: _factorized_features(model, methods.layers, comps, b, objective)  # noqa: E731
        width = sum(c.k for c in comps)  # 4096 per layer at GPT-2 size; less where a small layer caps it
    rows = batches[0]["input_ids"].shape[0]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as tmp, PeakRSS() as rss:
        store = FeatureStore(tmp, {"bench": name}, rows * len(batches), {"features": width}, shard_size=rows)
        store.write(0, {"features": featurize(batches[0]).cpu().numpy()})  # warm-up, not timed
        t = time.perf_counter()
        for i, b in enumerate(batches[1:], start=1):
            store.write(i, {"features": featurize(b).cpu().numpy()})  # .cpu() waits for the device
        seconds = time.perf_counter() - t
    tokens = sum(b["input_ids"].numel() for b in batches[1:])
    out = {"tokens_per_s": tokens / seconds, "peak_rss_mb": rss.peak, "step_seconds": seconds / (len(batches) - 1)}
    if device.type == "cuda":
        out["peak_device_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def run(
    n_layer: int,
    vocab: int,
    batch: int,
    seq_len: int,
    steps: int,
    repeats: int,
    materialized: bool = True,
    n_embd: int = 768,
    device: str = "cpu",
) -> dict:
    """The whole benchmark; returns the JSON document (``rows`` and a per-layer-shape breakdown)."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise DunegrassError(f"--device {device}: this PyTorch sees no CUDA device; run on the CPU (--device cpu)")
    device = canonical_device(device)
    model = build_model(n_layer, vocab, max(seq_len, 1024), n_embd).to(device)
    layers = factor_layers(model)
    methods = _Methods(layers)
    batches = [{k: v.to(device) for k, v in b.items()} for b in _batches(steps + 1, batch, seq_len, vocab, seed=1)]
    names = ["logra", "factgrass"] + (["materialized"] if materialized else [])
    per_layer = compression_times(model, methods, batches[0], repeats)
    rows = []
    for name in names:
        rows.append(
            {"method": name, "compress_seconds": sum(per_layer[name]), **throughput(model, methods, name, batches)}
        )
    base = rows[0]
    for r in rows:
        r["ratio_vs_logra"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["compress_speedup_vs_logra"] = base["compress_seconds"] / r["compress_seconds"]
    shapes: dict[str, dict] = {}
    for i, la in enumerate(layers):
        kind = la.name.split(".", 3)[-1]
        entry = shapes.setdefault(kind, {"layer": kind, "in_dim": la.in_dim, "out_dim": la.out_dim, "count": 0})
        entry["count"] += 1
        for name in names:
            entry[f"{name}_seconds"] = entry.get(f"{name}_seconds", 0.0) + per_layer[name][i]
    for entry in shapes.values():
        for name in names:
            entry[f"{name}_seconds"] /= entry["count"]
        entry["factgrass_speedup"] = entry["logra_seconds"] / entry["factgrass_seconds"]
    return {
        "benchmark": "factorized",
        "rows": rows,
        "layers": list(shapes.values()),
        "config": {
            "n_layer": n_layer,
            "n_embd": n_embd,
            "vocab": vocab,
            "batch": batch,
            "seq_len": seq_len,
            "steps": steps,
            "repeats": repeats,
            "k_per_layer": K,
            "logra": "gaussian 64x64",
            "factgrass": "random masks 128x128 > sjlt 4096",
            "materialized": "torch.func per-example gradients > sjlt 4096",
            "parameters": sum(p.numel() for p in model.parameters()),
            "compressed_layers": len(layers),
        },
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "loadavg_1min": os.getloadavg()[0],
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        },
    }


def _print(doc: dict) -> None:
    cfg = doc["config"]
    print(
        f"GPT-2-shaped, {cfg['n_layer']} blocks, {cfg['parameters'] / 1e6:.1f} M parameters, "
        f"{cfg['compressed_layers']} linear layers, k = {cfg['k_per_layer']} per layer, "
        f"{cfg['batch']} x {cfg['seq_len']} tokens, {doc['machine']['threads']} threads, "
        f"on {doc['machine']['device']}\n"
    )
    cols = ["method", "compress_seconds", "compress_speedup_vs_logra", "tokens_per_s", "ratio_vs_logra", "peak_rss_mb"]
    cols += ["peak_device_mb"] if "peak_device_mb" in doc["rows"][0] else []
    print_table(doc["rows"], cols)
    print("\nper layer (seconds to compress one batch):")
    names = [r["method"] for r in doc["rows"]]
    print_table(doc["layers"], ["layer", "in_dim", "out_dim", *[f"{n}_seconds" for n in names], "factgrass_speedup"])


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    seq_len = args.seq_len or (256 if args.quick else 512)
    steps = args.steps or (1 if args.quick else 2)
    n_layer, vocab = (1, 8192) if args.quick else (12, 50257)
    doc = run(
        n_layer,
        vocab,
        args.batch,
        seq_len,
        steps,
        args.repeats,
        materialized=not args.skip_materialized,
        device=args.device,
    )
    doc["config"]["quick"] = bool(args.quick)
    _print(doc)
    if args.json:
        atomic_write_json(args.json, doc)
        print(f"\nwrote {args.json}")
    return 0


__all__ = ["PeakRSS", "add_arguments", "build_model", "compression_times", "main", "run", "throughput"]
