"""GPU smoke test: every method on small models on the device, checked against the CPU, and the factorised benchmark.

    python benchmarks/gpu_smoke.py [--device cuda] [--json benchmarks/results/gpu_smoke.json] [--quick]

Part 1 — each attributor fits and scores on the device (model on the device, data on the host, as
users hold them): the BatchNorm CNN of the built-in digits-cnn task (left in train mode) and a tiny
GPT-2 with its default SDPA attention and padded batches. Each row: seconds on the device, the
Pearson correlation of its scores with the same run on the CPU, whether the top-5 proponents agree,
and the peak device memory. Deterministic methods must agree to float precision (Pearson ≥ 0.999;
cuDNN's TF32 convolutions are the only expected difference); Daunce trains its members on each
device, whose rounding differs, so its threshold is 0.95.

Part 2 — ground truth for a model with dropout in train mode (a GPT-2 as ``GPT2LMHeadModel(GPT2Config())``
builds it): subset retraining from scratch on the device twice gives the same values (each member's masks come
from the members' seeds), and the device's random generator is as it was.

Part 3 — ``dunegrass bench factorized`` on the device (GPT-2-small shape, k = 4096 per layer).

Prints one table per part, writes JSON, exits non-zero when a check fails. ``--device cpu --quick``
runs it on the CPU in seconds (the test suite does, so it stays runnable). Well under five minutes on
one GPU.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

import dunegrass as dg
from dunegrass.bench import digits_cnn, factorized_bench
from dunegrass.bench.table import print_table
from dunegrass.hf import tiny_gpt2
from dunegrass.store.atomic import atomic_write_json

CNN_METHODS = {
    "GradientInfluence": lambda m, t: dg.GradientInfluence(m, t, compressor="sjlt:512"),
    "GraSS": lambda m, t: dg.GraSS(m, t, k=512),
    "TRAK": lambda m, t: dg.TRAK(m, t, k=512),
    "TracIn": lambda m, t: dg.TracIn(m, t),
    "LoGra": lambda m, t: dg.LoGra(m, t, k_in=8, k_out=8),
    "FactGraSS": lambda m, t: dg.FactGraSS(m, t, k=256, mask_size=(32, 16)),
    "EKFAC": lambda m, t: dg.EKFAC(m, t, fisher="empirical"),  # the true Fisher's draws differ by device
    "ExactInfluence": lambda m, t: dg.ExactInfluence(m, t, hessian="gauss_newton", damping=0.1),
    "Daunce": lambda m, t: dg.Daunce(m, t, num_models=32, steps=30, train_batch_size=32),
}
LM_METHODS = {
    "GradientInfluence": lambda m, t: dg.GradientInfluence(m, t, compressor="sjlt:1024"),
    "GraSS": lambda m, t: dg.GraSS(m, t, k=1024),
    "LoGra": lambda m, t: dg.LoGra(m, t, k_in=16, k_out=16),
    "FactGraSS": lambda m, t: dg.FactGraSS(m, t, k=256, mask_size=(32, 32)),
    "EKFAC": lambda m, t: dg.EKFAC(m, t, fisher="empirical"),
    "Daunce (finetune)": lambda m, t: dg.Daunce(m, t, num_models=8, steps=8, train_batch_size=8, trainer="finetune"),
}
STOCHASTIC = ("Daunce",)


def _lm_data(n: int, seq: int, vocab: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, seq), generator=gen)
    lengths = torch.randint(seq // 2, seq + 1, (n,), generator=gen)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(build, model, task, train, queries, device: torch.device) -> tuple[dg.Scores, float, float | None]:
    model = copy.deepcopy(model).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    scores = build(model, task).fit(train).score(queries)
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return scores, seconds, peak


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def methods_on_device(device: torch.device, quick: bool) -> list[dict]:
    cnn = digits_cnn(n_train=96 if quick else 400, n_test=8, epochs=4.0 if quick else 10.0)
    cnn.model.train()  # as a user might leave it: attribution must run in eval mode and restore it
    x, y = cnn.train
    gpt = tiny_gpt2(vocab_size=96, n_layer=2, attn_implementation="sdpa")
    lm_train, lm_queries = _lm_data(48 if quick else 128, 16, 96, 0), _lm_data(6, 16, 96, 1)
    suites = [
        ("digits-cnn", CNN_METHODS, cnn.model, cnn.task, cnn.train, (x[:10], y[:10])),
        ("tiny-gpt2-sdpa", LM_METHODS, gpt, dg.CausalLMTask(), lm_train, lm_queries),
    ]
    rows = []
    for suite, methods, model, task, train, queries in suites:
        for name, build in methods.items():
            on_device, seconds, peak = _run(build, model, task, train, queries, device)
            on_cpu, _, _ = _run(build, model, task, train, queries, torch.device("cpu"))
            r = _pearson(on_device.values, on_cpu.values)
            top_agree = float((on_device.top(5).indices == on_cpu.top(5).indices).float().mean())
            need = 0.95 if name.startswith(STOCHASTIC) else 0.999
            rows.append(
                {
                    "model": suite,
                    "method": name,
                    "seconds": seconds,
                    "pearson_vs_cpu": r,
                    "top5_agreement": top_agree,
                    "peak_device_mb": peak,
                    "ok": bool(r >= need and torch.isfinite(on_device.values).all()),
                }
            )
            print(f"  {suite:>15} {name:<18} {seconds:7.2f} s   r = {r:.5f}", file=sys.stderr)
    return rows


def retraining_with_dropout(device: torch.device) -> dict:
    """Part 2: see the module docstring."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=96, n_positions=16, n_embd=32, n_layer=1, n_head=2)  # dropout 0.1 everywhere
    model = GPT2LMHeadModel(config).to(device)  # in train mode, as built
    train, queries = _lm_data(32, 16, 96, 2), _lm_data(4, 16, 96, 3)
    recipe = dg.TrainConfig(optimizer="adam", lr=1e-3, steps=5, batch_size=8)
    state = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
    _sync(device)
    start = time.perf_counter()
    runs = [
        dg.subset_retraining(model, dg.CausalLMTask(), train, queries, recipe, num_subsets=4).values for _ in range(2)
    ]
    _sync(device)
    after = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
    row = {
        "seconds": time.perf_counter() - start,
        "deterministic": bool(torch.equal(runs[0], runs[1])),
        "generator_restored": bool(torch.equal(state, after)),
        "finite": bool(torch.isfinite(runs[0]).all()),
        "still_in_train_mode": model.training,
    }
    row["ok"] = all(row[k] for k in ("deterministic", "generator_restored", "finite", "still_in_train_mode"))
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", default="benchmarks/results/gpu_smoke.json")
    p.add_argument("--quick", action="store_true", help="smaller data and a one-block factorised benchmark")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device is visible to this PyTorch; run with --device cpu to check the script", file=sys.stderr)
        return 2
    start = time.perf_counter()
    rows = methods_on_device(device, args.quick)
    print(f"\nevery method on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'host'}):")
    print_table(rows, ["model", "method", "seconds", "pearson_vs_cpu", "top5_agreement", "peak_device_mb", "ok"])
    retraining = retraining_with_dropout(device)
    print(f"\nground truth with train-mode dropout on {device}: {retraining}")
    n_layer, vocab, seq, steps = (1, 8192, 128, 1) if args.quick else (12, 50257, 512, 2)
    factorized = factorized_bench.run(n_layer, vocab, 4, seq, steps, repeats=3, device=str(device))
    print(f"\nfactorised compression on {device}:")
    factorized_bench._print(factorized)
    doc = {
        "benchmark": "gpu_smoke",
        "device": str(device),
        "quick": args.quick,
        "rows": rows,
        "retraining": retraining,
        "factorized": factorized,
        "seconds": time.perf_counter() - start,
    }
    atomic_write_json(args.json, doc)
    print(f"\nwrote {args.json} ({doc['seconds']:.0f} s in all)")
    return 0 if all(r["ok"] for r in rows) and retraining["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
