"""LDS on a causal-LM task: LoGra, FactGraSS (random and selective masks) and TracIn on a tiny GPT-2
fine-tuned on Python standard-library docstrings (dunegrass.bench.lm; built offline).

Ground truth: the pretrained model fine-tuned on ``--subsets`` random half-subsets of the training
windows with θ₀'s own recipe, query loss recorded (cached under ``--cache``). Two compression levels:
the paper's per-layer defaults (LoGra 64 × 64, FactGraSS 128 × 128 → 4096; on this model's 64–256-wide
layers that is close to no compression) and k = 256 per layer (LoGra 16 × 16, FactGraSS 32 × 32 → 256,
the paper's 4k′ = k′_out·k′_in ratio), which compresses each layer 16–65×.

    python benchmarks/lm_lds.py [--quick] [--subsets 50] [--json benchmarks/results/lm_lds.json]
"""

from __future__ import annotations

import argparse
import os

import torch

import dunegrass as dg
from dunegrass.bench.lm import lm_ground_truth, lm_task
from dunegrass.methods.factorized import FactGraSS, LoGra

from common import Timer, print_table, write_json

HERE = os.path.dirname(os.path.abspath(__file__))


def methods(model, task):
    """(method, k per layer, factory) rows of the table."""
    yield "LoGra", 256, lambda: LoGra(model, task, k_in=16, k_out=16)
    yield "FactGraSS (random)", 256, lambda: FactGraSS(model, task, k=256, mask_size=(32, 32))
    yield (
        "FactGraSS (selective)",
        256,
        lambda: FactGraSS(model, task, k=256, mask_size=(32, 32), mask="selective"),
    )
    yield "LoGra", 4096, lambda: LoGra(model, task)
    yield "FactGraSS (random)", 4096, lambda: FactGraSS(model, task)
    yield "FactGraSS (selective)", 4096, lambda: FactGraSS(model, task, mask="selective")
    yield "TracIn (exact gradient dot, all parameters)", None, lambda: dg.TracIn(model, task)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the quick benchmark task and 20 subsets")
    p.add_argument("--subsets", type=int, default=None, help="ground-truth fine-tunes (default 50; 20 with --quick)")
    p.add_argument("--cache", default=os.path.join(HERE, "..", "runs", "lm"), help="models and ground truth")
    p.add_argument("--json", default=os.path.join(HERE, "results", "lm_lds.json"))
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    subsets = args.subsets or (20 if args.quick else 50)
    tag = "quick" if args.quick else "full"

    with Timer() as t_task:
        bench = lm_task(quick=args.quick, cache_dir=args.cache)
    with torch.no_grad():
        loss = lambda m, d: float(bench.task.loss(bench.task.outputs(m, d), d).mean())  # noqa: E731
        base = bench.base_model()
        losses = {
            "base_train": loss(base, bench.train),
            "base_query": loss(base, bench.queries),
            "tuned_train": loss(bench.model, bench.train),
            "tuned_query": loss(bench.model, bench.queries),
        }
    info = bench.info
    print(f"benchmark: {info['n_train']} training / {info['n_query']} query windows of {info['seq_len']} characters,")
    print(f"GPT-2 with {info['parameters']} parameters; mean token loss {losses}\n")
    with Timer() as t_gt:
        gt = lm_ground_truth(bench, num_subsets=subsets, cache_path=os.path.join(args.cache, f"gt-{tag}-{subsets}.npz"))
    print(f"ground truth: {subsets} subset fine-tunes ({t_gt.seconds:.0f} s, 0 if cached)\n")

    rows = []
    for name, k, make in methods(bench.model, bench.task):
        with Timer() as t:
            scores = make().fit(bench.train).score(bench.queries)
        result = dg.lds(scores, gt)
        rows.append(
            {
                "method": name,
                "k_per_layer": k if k is not None else "full",
                "lds": result.mean,
                "ci95": [result.low, result.high],
                "seconds": t.seconds,
            }
        )
        print(f"  {name} (k={k}): LDS {result}  [{t.seconds:.1f} s]")
    print()
    print_table(rows, ["method", "k_per_layer", "lds", "ci95", "seconds"])
    command = "python benchmarks/lm_lds.py" + (" --quick" if args.quick else "") + f" --subsets {subsets}"
    command += f" --threads {args.threads}" if args.threads else ""
    write_json(
        args.json,
        "lm_lds",
        rows,
        command=command,
        task=bench.info,
        losses=losses,
        ground_truth={k: v for k, v in gt.config.items() if k != "member_seeds"},
        seconds={"task": t_task.seconds, "ground_truth": t_gt.seconds},
    )


if __name__ == "__main__":
    main()
