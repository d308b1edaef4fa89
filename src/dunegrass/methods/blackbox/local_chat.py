"""A chat fine-tuning service emulated in this process: members fine-tuned locally, their losses read
through the chat protocol's ``top_logprobs`` exactly as from a chat API.

``LocalChatBackend`` answers the question a user of a chat fine-tuning API asks before paying: how much
of Daunce's accuracy survives when each loss comes from a greedy reply's top-20 alternatives (floored
below them, cut short where the answer leaves the reply) instead of the exact log-likelihood? Its
members are fine-tuned as ``LocalBackend``'s are (the chat template, loss on the answer); its losses go
through ``ChatProtocol.losses`` unchanged, with ``TorchChatClient`` in place of the OpenAI client:
greedy decoding of at most ``max_answer_tokens`` tokens with the model's chat template, each position
reported with its log-probability and the ``top_logprobs`` best alternatives, as the API reports them.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from ...data import Padded
from ...errors import DunegrassError
from ...fingerprint import model_fingerprint
from ...gradients.per_sample import FunctionalModel
from ...task import CausalLMTask
from ...train import TrainConfig
from ...train.lora import LoraConfig, load_state
from ..base import eval_mode
from .base import BlackBoxBackend
from .examples import PromptCompletions
from .local import LocalBackend
from .protocols import ChatProtocol


def chat_examples(tokenizer: Any, rows: PromptCompletions | list[dict], max_length: int = 512) -> Padded:
    """Token ids of each row as the chat template lays it out (system, user, assistant), labels on the
    answer only: what a chat fine-tuning job trains on."""
    examples = []
    for i in range(len(rows)):
        ex = rows[i]
        head = ChatProtocol._messages(ex)
        start = tokenizer.apply_chat_template(head, add_generation_prompt=True, tokenize=True)
        answer = [{"role": "assistant", "content": ex["completion"]}]
        whole = tokenizer.apply_chat_template(head + answer, tokenize=True)
        start, whole = _ids(start), _ids(whole)
        if len(start) >= min(len(whole), max_length):
            raise DunegrassError(
                f"example {i}: its prompt takes {len(start)} tokens, so max_length = {max_length} leaves none of "
                "its answer to train on; raise max_length or shorten the prompt"
            )
        ids = torch.tensor(whole[:max_length], dtype=torch.long)
        labels = ids.clone()
        labels[: len(start)] = -100
        examples.append({"input_ids": ids, "labels": labels})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return Padded(examples, pad_id=pad)


def _ids(out: Any) -> list[int]:
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# Tokens that end an assistant's turn in the common chat templates (ChatML, Llama 3, Gemma, Phi).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


class TorchChatClient:
    """``client.chat.completions.create(model=, messages=, max_tokens=, temperature=0, logprobs=True,
    top_logprobs=)`` answered by a torch causal LM: the response shape of OpenAI's chat endpoint, the
    reply greedy, ending at the tokenizer's end-of-text token or a common end-of-turn token (not reported,
    as the API does not report it)."""

    def __init__(self, model: nn.Module, tokenizer: Any):
        self.model, self.tokenizer = model, tokenizer
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._create))
        vocab = tokenizer.get_vocab()
        stops = {tokenizer.eos_token_id} | {vocab[t] for t in END_OF_TURN if t in vocab}
        self.stops = {s for s in stops if isinstance(s, int)}
        # transformers 5.24 renamed past_key_values to cache (the old name warns, and goes in 5.40)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft's forward takes **kw
        forward = inspect.signature(base.forward).parameters
        self.cache_kwarg = "cache" if "cache" in forward else "past_key_values"

    @torch.no_grad()
    def _create(self, *, model: str, messages: list, max_tokens: int, top_logprobs: int, **ignored: Any):
        device = next(self.model.parameters()).device
        ids = _ids(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        ids, past = torch.tensor([ids], device=device), None
        content = []
        for _ in range(max_tokens):
            # the prompt once, then a token at a time on the cache
            out = self.model(input_ids=ids, use_cache=True, **({} if past is None else {self.cache_kwarg: past}))
            past = out["cache"] if "cache" in out else out.get("past_key_values")
            logp = torch.log_softmax(out.logits[0, -1].double(), -1)
            best = logp.topk(max(1, top_logprobs))  # the greedy token is the first
            token = int(best.indices[0])
            if token in self.stops:
                break
            alts = [self._entry(int(t), float(v)) for v, t in zip(best.values, best.indices)]
            content.append(SimpleNamespace(**vars(self._entry(token, float(logp[token]))), top_logprobs=alts))
            ids = ids.new_tensor([[token]])
        logprobs = SimpleNamespace(content=content)
        return SimpleNamespace(choices=[SimpleNamespace(logprobs=logprobs)])

    def _entry(self, token: int, logprob: float) -> SimpleNamespace:
        text = self.tokenizer.decode([token])
        return SimpleNamespace(token=text, bytes=list(text.encode()), logprob=logprob)


class LocalChatBackend(BlackBoxBackend):
    """Members fine-tuned here on ``{"prompt", "completion"}`` rows (``"system"`` optional) with the
    tokenizer's chat template; each member's losses read through ``ChatProtocol`` (``top_logprobs``,
    ``max_answer_tokens``) from ``TorchChatClient``. ``stats`` counts floored and cut-short answers."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        config: TrainConfig,
        lora: LoraConfig | None = None,
        top_logprobs: int = 20,
        max_answer_tokens: int = 4,
        max_length: int = 512,
    ):
        if getattr(tokenizer, "chat_template", None) is None:
            raise DunegrassError("LocalChatBackend needs a tokenizer with a chat template (the chat format)")
        self.tokenizer, self.max_length = tokenizer, max_length
        self.local = LocalBackend(model, CausalLMTask(), config, lora)
        self.protocol = ChatProtocol(max_answer_tokens, top_logprobs)

    @property
    def model(self) -> nn.Module:
        return self.local.model

    @property
    def stats(self) -> dict:
        return dict(self.protocol.stats)

    def check(self, data: Any) -> None:
        self.protocol.check(_rows(data))

    def fine_tune(self, train: Any, indices: Tensor, seed: int) -> str:
        return self.local.fine_tune(chat_examples(self.tokenizer, _rows(train), self.max_length), indices, seed)

    def losses(self, handle: str, data: Any) -> Tensor:
        if handle not in self.local.members:
            raise DunegrassError(f"no local member {handle!r}: local members live in this process's memory")
        local = self.local
        with eval_mode(local.model):
            session = local._session()
            try:
                state = local.files.load(local.members[handle], next(local.model.parameters()).device)
                if local.lora is not None:
                    load_state(session.net, state)  # the adapters, removed at close
                    net = session.net
                else:  # a functional call: the model itself never holds a member's weights
                    net = FunctionalModel(session.net, dict(state))
                return self.protocol.losses(TorchChatClient(net, self.tokenizer), "local", _rows(data))
            finally:
                session.close()

    def has_model(self, handle: str) -> bool:
        return self.local.has_model(handle)

    def config(self) -> dict:
        return {
            **self.local.config(),
            "backend": "local-chat",
            "weights": model_fingerprint(self.local.model),
            "protocol": self.protocol.config(),
        }


def _rows(data: Any) -> PromptCompletions:
    return data if isinstance(data, PromptCompletions) else PromptCompletions(list(data))
