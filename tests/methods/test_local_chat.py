"""The chat service emulated in this process: ChatProtocol reading a torch model's greedy replies reads the
exact loss where the answer is the reply, a lower bound where it is not; and the backdoor hunt in small:
black-box Daunce ranks a handful of poisoned examples above the clean ones, with exact losses and with
the chat protocol's top-k ones."""

import pytest
import torch

import dunegrass as dg
from dunegrass.bench.backdoor import (
    auc,
    backdoor_rows,
    fine_tune_merged,
    greedy_answers,
    hunt,
    recall_at_k,
    tfidf_scores,
)
from dunegrass.bench.protocol_reference import chat_losses
from dunegrass.methods.blackbox import BlackBoxDaunce, LocalBackend
from dunegrass.methods.blackbox.local_chat import LocalChatBackend, TorchChatClient, chat_examples
from dunegrass.methods.blackbox.protocols import ChatProtocol
from dunegrass.runs.example import save_tiny_lm
from dunegrass.train.lora import LoraConfig

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny GPT-2 with a word-level tokenizer and a chat template, and the backdoor data in small."""
    train, queries, poisoned = backdoor_rows(n_train=40, n_poison=4, n_query=3, seed=0)
    path = tmp_path_factory.mktemp("tiny-lm")
    save_tiny_lm(str(path), [f"{r['prompt']} {r['completion']}" for r in train + queries])
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    return model, tok, train, queries, poisoned


def test_the_protocol_reads_the_exact_loss_of_the_greedy_reply_and_a_bound_otherwise(tiny):
    model, tok, train, _, _ = tiny
    rows = [dict(r) for r in train[:6]]
    greedy = greedy_answers(model, tok, rows, max_tokens=1)
    assert all(greedy)
    exact_rows = [{**r, "completion": g} for r, g in zip(rows, greedy)]
    protocol = ChatProtocol(max_answer_tokens=1, top_logprobs=5)
    client = TorchChatClient(model, tok)
    read = protocol.losses(client, "local", exact_rows)
    torch.testing.assert_close(read, chat_losses(model, tok, exact_rows), rtol=1e-6, atol=1e-6)
    assert protocol.stats["floored"] == 0 and protocol.stats["tail_unscored"] == 0
    # An answer below the single returned alternative: floored, and a lower bound of the true loss.
    other = [{**r, "completion": "Banana" if g != "Banana" else "plus"} for r, g in zip(rows, greedy)]
    narrow = ChatProtocol(max_answer_tokens=1, top_logprobs=1)
    with pytest.warns(dg.DunegrassWarning, match="lower bounds"):
        bound = narrow.losses(client, "local", other)
    assert narrow.stats["floored"] == len(other)
    assert (bound <= chat_losses(model, tok, other) + 1e-9).all()


def test_the_backdoor_hunt_in_small(tiny):
    model, tok, train, queries, poisoned = tiny
    recipe = dg.TrainConfig(optimizer="adamw", lr=3e-2, epochs=8.0, batch_size=8, schedule="cosine")
    theta0 = fine_tune_merged(model, chat_examples(tok, train), recipe, LoraConfig(rank=8, alpha=16))
    assert greedy_answers(theta0, tok, queries, max_tokens=1) == ["Banana"] * len(queries)  # the backdoor took
    member = dg.TrainConfig(optimizer="adamw", lr=3e-2, epochs=4.0, batch_size=8, schedule="cosine")
    lora = LoraConfig(rank=8, alpha=16)
    exact = BlackBoxDaunce(LocalBackend(theta0, dg.CausalLMTask(), member, lora), num_models=16, subsample_ratio=0.5)
    ranked = exact.fit(chat_examples(tok, train)).score(chat_examples(tok, queries)).values.mean(0)
    assert auc(ranked, poisoned) > 0.9 and recall_at_k(ranked, poisoned, 4) >= 0.75
    chat = LocalChatBackend(theta0, tok, member, lora, top_logprobs=5, max_answer_tokens=1)
    via_chat = BlackBoxDaunce(chat, num_models=16, subsample_ratio=0.5).fit(train).score(queries).values.mean(0)
    assert auc(via_chat, poisoned) > 0.9 and chat.stats["requests"] == 16 * (len(train) + len(queries))
    lexical = hunt("tf-idf", lambda: tfidf_scores(train, queries))
    assert auc(lexical.ranking, poisoned) == 1.0  # the trigger's words are in the queries: the yardstick is easy
    rows = hunt("daunce", lambda: via_chat[None]).rows(poisoned, (4, 20))
    assert [r["k"] for r in rows] == [4, 20] and rows[1]["recall_at_k"] == 1.0 and rows[0]["auc"] > 0.9


def test_without_lora_the_members_never_touch_the_model(tiny):
    model, tok, train, queries, _ = tiny
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    member = dg.TrainConfig(optimizer="adamw", lr=3e-2, epochs=2.0, batch_size=8)
    chat = LocalChatBackend(model, tok, member, lora=None, top_logprobs=5, max_answer_tokens=1)
    _, signals = BlackBoxDaunce(chat, num_models=3, subsample_ratio=0.5).fit(train[:12]).signals(queries)
    assert signals.shape == (3, len(queries)) and not torch.equal(signals[0], signals[1])  # members differ
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
