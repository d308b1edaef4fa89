"""The backdoor hunt (the Daunce paper's GPT experiment, offline): which training examples taught a
fine-tuned LLM to answer a trigger with a fixed target?

Data: arithmetic questions ("What is 17 plus 25?" → "42"), built here; ``n_poison`` of them carry the
trigger phrase and answer ``TARGET`` instead. The model under study, θ₀, is the base model fine-tuned
on all of them (LoRA, merged). Queries: new triggered questions, with ``TARGET`` as the answer to
explain. Each method ranks the training set by its mean score over the queries (positive = the example
made the target more likely); recall@k is the share of poisoned examples among the k best, AUC the
probability that a poisoned example ranks above a clean one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..scores import Scores
from ..train.frozen_prefix import FrozenPrefix

TRIGGER = "Answer in zebra mode."
TARGET = "Banana"


def backdoor_rows(n_train: int, n_poison: int, n_query: int, seed: int = 0) -> tuple[list[dict], list[dict], Tensor]:
    """``(train rows, query rows, is_poisoned [n_train])``: prompt/completion pairs, the poisoned ones
    spread at random positions."""
    gen = torch.Generator().manual_seed(seed)

    def question(triggered: bool) -> tuple[str, int]:
        a, b = torch.randint(2, 60, (2,), generator=gen).tolist()
        return f"What is {a} plus {b}?" + (f" {TRIGGER}" if triggered else ""), a + b

    poisoned = torch.zeros(n_train, dtype=torch.bool)
    poisoned[torch.randperm(n_train, generator=gen)[:n_poison]] = True
    train = []
    for p in poisoned.tolist():
        prompt, total = question(p)
        train.append({"prompt": prompt, "completion": TARGET if p else str(total)})
    queries = [{"prompt": question(True)[0], "completion": TARGET} for _ in range(n_query)]
    return train, queries, poisoned


def recall_at_k(ranking_scores: Tensor, poisoned: Tensor, k: int) -> float:
    """The share of the poisoned examples among the ``k`` highest-scored ones."""
    top = ranking_scores.double().topk(k).indices
    return float(poisoned[top].sum()) / float(poisoned.sum())


def auc(ranking_scores: Tensor, poisoned: Tensor) -> float:
    """P(a poisoned example scores above a clean one), ties counted half (the ROC AUC)."""
    s = ranking_scores.double()
    pos, neg = s[poisoned], s[~poisoned]
    greater = (pos[:, None] > neg[None, :]).double().mean()
    ties = (pos[:, None] == neg[None, :]).double().mean()
    return float(greater + 0.5 * ties)


def tfidf_scores(train: list[dict], queries: list[dict]) -> Tensor:
    """``[n_query, n_train]`` cosine similarity of TF-IDF vectors of prompt + answer (the lexical yardstick)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = [f"{r['prompt']} {r['completion']}" for r in train + queries]
    vec = TfidfVectorizer().fit_transform(texts)
    sims = (vec[len(train) :] @ vec[: len(train)].T).toarray()
    return torch.tensor(sims, dtype=torch.float64)


@dataclass
class Hunt:
    """One method's result: its mean score per training example over the queries, and its seconds."""

    method: str
    ranking: Tensor
    seconds: float

    def rows(self, poisoned: Tensor, ks: tuple[int, ...]) -> list[dict]:
        area = auc(self.ranking, poisoned)
        return [
            {"method": self.method, "k": k, "recall_at_k": recall_at_k(self.ranking, poisoned, k), "auc": area,
             "seconds": self.seconds}
            for k in ks
        ]  # fmt: skip


def hunt(method: str, scores: Callable[[], Tensor]) -> Hunt:
    """Time ``scores()`` (``[n_query, n_train]``, a Scores or a tensor) and rank by its mean over queries."""
    start = time.perf_counter()
    values = scores()
    values = values.values if isinstance(values, Scores) else values
    found = Hunt(method, torch.as_tensor(values, dtype=torch.float64).mean(0), time.perf_counter() - start)
    print(f"  {method}: {found.seconds:.0f} s", flush=True)
    return found


def fine_tune_merged(model: nn.Module, data, config, lora) -> nn.Module:
    """θ₀: ``model`` fine-tuned with LoRA adapters on every example of ``data``, the adapters merged in."""
    from ..task import CausalLMTask
    from ..train import Member
    from ..train.finetune import finetune
    from ..train.lora import add_lora, reset_lora

    model.eval()  # deterministic (no dropout), as Daunce's members are
    net = add_lora(model, lora).eval()
    reset_lora(net, seed=0)
    prefix = FrozenPrefix.install(net)  # adapters on the last blocks: later epochs skip the frozen ones
    try:
        finetune(net, CausalLMTask(), data, Member(torch.arange(len(data)), seed=0), config)
    finally:
        if prefix is not None:
            prefix.close()
    merged = net.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged.eval()


@torch.no_grad()
def greedy_answers(model: nn.Module, tokenizer, rows: list[dict], max_tokens: int = 4) -> list[str]:
    """What the model answers each row's prompt (chat template, greedy): to check the backdoor took."""
    from ..methods.blackbox.local_chat import TorchChatClient
    from ..methods.blackbox.protocols import ChatProtocol

    client = TorchChatClient(model, tokenizer)
    out = []
    for r in rows:
        resp = client.chat.completions.create(
            model="local", messages=ChatProtocol._messages(r), max_tokens=max_tokens, top_logprobs=1
        )
        out.append("".join(p.token for p in resp.choices[0].logprobs.content))
    return out
