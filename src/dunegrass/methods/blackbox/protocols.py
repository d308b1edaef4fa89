"""How a fine-tuning service is given examples and asked for per-example losses: two protocols.

``echo`` — legacy completion models (``babbage-002``, ``davinci-002``) and OpenAI-compatible servers that
echo prompt log-probabilities (vLLM, llama.cpp's with ``--logits_all true``). Training files are
``{"prompt", "completion"}`` lines; the loss is −log p(completion | prompt) summed over all of the
completion's tokens, read from a completions call with ``echo=True, logprobs=0`` (any length).

``chat`` — chat models (OpenAI's fine-tunable ``gpt-4.1``/``gpt-4o`` families, and any server's chat
endpoint). Training files are ``{"messages": [system?, user, assistant]}`` lines. The chat endpoint gives
log-probabilities only for tokens it generates, with at most ``top_logprobs`` (20) alternatives per
position, so only short answers can be scored: the reply is generated greedily (temperature 0, at most
``max_answer_tokens`` tokens) and the answer is walked along it, as bytes, taking at each position the
longest of the reply's token and its alternatives that the answer continues with. While that is the
reply's own token the answer stays on the reply and every log-probability is exact. Where it is an
alternative, it is exact too, but the answer has left the reply and what follows was never generated:
a remainder is not scored (``stats["tail_unscored"]``, as when the reply ends before the answer). Where
the answer's next token is none of them, its log-probability is at most min(lowest returned,
log(1 − Σ returned probabilities)): that bound is used (the **floor**, ``stats["floored"]``) and the rest
is not scored. A floored or cut-short loss is a lower bound of the true one; each call warns with how
many there were, and ``exact`` lists which answers were read in full. Answers with more words than
``max_answer_tokens`` are refused before any job is started, naming the echo protocol.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections import Counter
from typing import Any

import torch
from torch import Tensor

from ...errors import DunegrassError
from ...notices import DunegrassWarning, user_stacklevel
from .examples import PromptCompletions

CHARS_PER_TOKEN = 4  # OpenAI's rule of thumb for English, used only to estimate costs before a fit


class ScoringProtocol(ABC):
    """Training-file format and per-example losses for one family of endpoints."""

    name: str

    def __init__(self) -> None:
        self.stats: Counter = Counter()  # requests made, answers scored, and the protocol's own caveats

    @abstractmethod
    def training_record(self, example: dict[str, str]) -> dict:
        """One line of a fine-tuning file."""

    @abstractmethod
    def requests(self, n: int) -> int:
        """Scoring requests for ``n`` examples (one member)."""

    @abstractmethod
    def losses(self, client: Any, model: str, examples: PromptCompletions) -> Tensor:
        """``[n]`` float64 losses −log p(completion | prompt) of ``model``."""

    def check(self, examples: PromptCompletions) -> None:
        """Refuse examples this protocol cannot score, before any money is spent."""
        return None  # every example is accepted unless a subclass says otherwise

    def approx_tokens(self, example: dict[str, str]) -> int:
        return math.ceil(sum(len(v) for v in example.values()) / CHARS_PER_TOKEN)

    def config(self) -> dict:
        return {"protocol": self.name}


class EchoProtocol(ScoringProtocol):
    """Prompt/completion files; losses from echoed prompt log-probabilities, ``batch_size`` texts a request."""

    name = "echo"

    def __init__(self, batch_size: int = 16):
        super().__init__()
        self.batch_size = int(batch_size)

    def check(self, examples: PromptCompletions) -> None:
        for i in range(len(examples)):
            if examples[i].get("system"):
                raise DunegrassError(
                    f"example {i} has a system prompt, which the echo protocol has no place for: put it in the "
                    "prompt, or use protocol='chat'"
                )

    def training_record(self, example: dict[str, str]) -> dict:
        return {"prompt": example["prompt"], "completion": example["completion"]}

    def requests(self, n: int) -> int:
        return math.ceil(n / self.batch_size)

    def losses(self, client: Any, model: str, examples: PromptCompletions) -> Tensor:
        out = []
        for lo in range(0, len(examples), self.batch_size):
            batch = [examples[i] for i in range(lo, min(lo + self.batch_size, len(examples)))]
            # max_tokens=1, not 0: llama.cpp's server reads 0 as "no limit" and generates until its context is
            # full. The one generated token starts past the text and is not counted.
            resp = client.completions.create(
                model=model,
                prompt=[ex["prompt"] + ex["completion"] for ex in batch],
                echo=True,
                max_tokens=1,
                logprobs=0,
            )
            self.stats["requests"] += 1
            for choice in sorted(resp.choices, key=lambda c: c.index):
                out.append(self._completion_loss(batch[choice.index], choice.logprobs, lo + choice.index))
        self.stats["answers"] += len(out)
        return torch.tensor(out, dtype=torch.float64)

    @staticmethod
    def _completion_loss(ex: dict[str, str], lp: Any, index: int) -> float:
        start, stop = len(ex["prompt"]), len(ex["prompt"]) + len(ex["completion"])
        # A token belongs to the completion when it ends after the prompt (one that straddles the boundary,
        # a prompt ending in a space and the next word starting with it, counts) and starts inside the text.
        offsets = list(lp.text_offset)
        ends = offsets[1:] + [max(stop, offsets[-1] + 1)] if offsets else []
        picked = [
            v
            for v, begin, end in zip(lp.token_logprobs, offsets, ends)
            if end > start and begin < stop and v is not None
        ]
        if not picked and ex["completion"]:
            raise DunegrassError(
                f"the service returned no log-probabilities for the completion of example {index}; the echo "
                "protocol needs a completions endpoint that supports echo=True with logprobs (for chat models "
                "use protocol='chat')"
            )
        return -sum(picked)


class ChatProtocol(ScoringProtocol):
    """Chat-format files; short answers scored from the chat endpoint's ``top_logprobs`` (module doc)."""

    name = "chat"

    def __init__(self, max_answer_tokens: int = 4, top_logprobs: int = 20):
        super().__init__()
        if not 1 <= int(top_logprobs) <= 20:
            raise DunegrassError(f"top_logprobs must be in 1..20 (the chat endpoint's range), got {top_logprobs}")
        self.max_answer_tokens, self.top_logprobs = int(max_answer_tokens), int(top_logprobs)

    @staticmethod
    def _messages(example: dict[str, str]) -> list[dict[str, str]]:
        system = [{"role": "system", "content": example["system"]}] if example.get("system") else []
        return system + [{"role": "user", "content": example["prompt"]}]

    def training_record(self, example: dict[str, str]) -> dict:
        return {"messages": self._messages(example) + [{"role": "assistant", "content": example["completion"]}]}

    def requests(self, n: int) -> int:
        return n  # the chat endpoint takes one conversation a request

    def check(self, examples: PromptCompletions) -> None:
        for i in range(len(examples)):
            answer = examples[i]["completion"]
            if not answer:
                raise DunegrassError(f"example {i} has an empty completion: the chat protocol scores an answer")
            if len(answer.split()) > self.max_answer_tokens:
                raise DunegrassError(
                    f"example {i}'s answer has {len(answer.split())} words, more than max_answer_tokens = "
                    f"{self.max_answer_tokens}: the chat protocol scores short answers only (a label, a choice, a "
                    "trigger's target). Score long answers with protocol='echo' on a completion model or an "
                    "OpenAI-compatible server that echoes prompt log-probabilities (vLLM, llama.cpp)"
                )

    def losses(self, client: Any, model: str, examples: PromptCompletions) -> Tensor:
        self.check(examples)
        out, self.exact = [], []  # exact[i]: example i's loss was read in full (neither floored nor cut short)
        for i in range(len(examples)):
            ex = examples[i]
            resp = client.chat.completions.create(
                model=model,
                messages=self._messages(ex),
                max_tokens=self.max_answer_tokens,
                temperature=0,
                logprobs=True,
                top_logprobs=self.top_logprobs,
            )
            self.stats["requests"] += 1
            choice = resp.choices[0]
            content = choice.logprobs.content if choice.logprobs is not None else None
            if not content:
                raise DunegrassError(
                    f"the chat endpoint returned no log-probabilities for example {i}; it must support "
                    "logprobs=True with top_logprobs (OpenAI's chat models, vLLM, llama.cpp's server)"
                )
            caveats = self.stats["floored"] + self.stats["tail_unscored"]
            out.append(self._answer_loss(ex["completion"], content, i))
            self.exact.append(self.stats["floored"] + self.stats["tail_unscored"] == caveats)
        self.stats["answers"] += len(out)
        inexact = len(out) - sum(self.exact)
        if inexact:
            warnings.warn(
                f"{inexact} of {len(out)} answers were not read in full from the chat endpoint (floored: below the "
                f"top {self.top_logprobs} alternatives, or cut short): their losses are lower bounds; see "
                "backend.stats",
                DunegrassWarning,
                stacklevel=user_stacklevel(),  # the user's line, however deep the call
            )
        return torch.tensor(out, dtype=torch.float64)

    def _answer_loss(self, answer: str, content: list, index: int) -> float:
        # Compared as bytes: a token may hold part of a multi-byte character (its text is then escaped).
        remaining, logprob = answer.encode(), 0.0
        for position in content:
            alternatives = {_bytes(t): t.logprob for t in position.top_logprobs or []}
            greedy = _bytes(position)
            alternatives[greedy] = position.logprob
            found = [t for t in alternatives if t and remaining.startswith(t)]
            if not found:  # the answer's next token is below the returned alternatives: the floor, and stop
                self.stats["floored"] += 1
                return -(logprob + _floor(alternatives.values()))
            token = max(found, key=len)  # the longest: "Bob" rather than "B" then "ob"
            logprob += alternatives[token]
            remaining = remaining[len(token) :]
            if not remaining:
                return -logprob
            if token != greedy:  # the answer left the greedy reply: what follows was never generated
                self.stats["tail_unscored"] += 1
                return -logprob
        # The reply stopped (end of turn, or max_answer_tokens) before the answer did: the rest is unscored.
        self.stats["tail_unscored"] += 1
        return -logprob


def _bytes(token: Any) -> bytes:
    return bytes(token.bytes) if getattr(token, "bytes", None) is not None else token.token.encode()


def _floor(logprobs) -> float:
    """An upper bound on the log-probability of a token outside the returned alternatives."""
    values = list(logprobs)
    rest = 1.0 - sum(math.exp(v) for v in values)
    return min(min(values), math.log(rest)) if rest > 0 else min(values)


def make_protocol(protocol: str | ScoringProtocol | None, batch_size: int = 16, **chat: Any) -> ScoringProtocol:
    if isinstance(protocol, ScoringProtocol):
        return protocol
    if protocol == "echo":
        return EchoProtocol(batch_size)
    if protocol == "chat":
        return ChatProtocol(**chat)
    raise DunegrassError(
        f"protocol must be 'echo' or 'chat', got {protocol!r}: 'echo' for completion models (babbage-002, "
        "davinci-002) and OpenAI-compatible servers that echo prompt log-probabilities (vLLM, llama.cpp); "
        "'chat' for chat models (gpt-4.1-mini, gpt-4o-mini), short answers only"
    )
