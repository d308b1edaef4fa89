"""An OpenAI-compatible HTTP API as Daunce's fine-tuning service (the ``openai`` client: extra ``[api]``).

Examples are ``{"prompt": str, "completion": str}``. A member is one fine-tuning job on its subset
(uploaded as JSONL, started with the member's seed); its signal on an example is
−log p(completion | prompt), summed over the completion's tokens, read from a completions call that
echoes the prompt with log-probabilities (``echo=True, max_tokens=0, logprobs=0``): the tokens whose
text offset is at or past the end of the prompt.

The API key is read from the environment (``api_key_env``) when the client is made; it is never
stored, logged, or part of a cache's configuration.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ...errors import DunegrassError
from .base import BlackBoxBackend


class PromptCompletions(Dataset):
    """A list of ``{"prompt": str, "completion": str}`` examples as a map-style dataset."""

    def __init__(self, examples: list[Mapping[str, str]]):
        for i, ex in enumerate(examples):
            if (
                not isinstance(ex, Mapping)
                or not isinstance(ex.get("prompt"), str)
                or not isinstance(ex.get("completion"), str)
            ):
                raise DunegrassError(f"example {i} must be a dict with string 'prompt' and 'completion'")
        self.examples = [{"prompt": ex["prompt"], "completion": ex["completion"]} for ex in examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, str]:
        return self.examples[i]


def as_examples(data: Any) -> PromptCompletions:
    return data if isinstance(data, PromptCompletions) else PromptCompletions(list(data))


class OpenAICompatibleBackend(BlackBoxBackend):
    """Fine-tune ``base_model`` at ``base_url`` (default: the client's) and score with its completions API.

    ``hyperparameters`` go to the fine-tuning job as they are (e.g. ``{"n_epochs": 1}``); jobs are
    polled every ``poll_seconds`` for at most ``timeout_seconds``. ``batch_size`` prompts go in one
    completions request.
    """

    def __init__(
        self,
        base_model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        hyperparameters: Mapping[str, Any] | None = None,
        poll_seconds: float = 10.0,
        timeout_seconds: float = 24 * 3600.0,
        batch_size: int = 16,
    ):
        self.base_model, self.base_url, self.api_key_env = base_model, base_url, api_key_env
        self.hyperparameters = dict(hyperparameters or {})
        self.poll_seconds, self.timeout_seconds, self.batch_size = poll_seconds, timeout_seconds, batch_size
        self._client = None

    @property
    def client(self):
        if self._client is None:
            try:
                import openai
            except ImportError as e:
                raise DunegrassError("the OpenAI-compatible back end needs: pip install 'dunegrass[api]'") from e
            key = os.environ.get(self.api_key_env)
            if not key:
                raise DunegrassError(f"set the API key in the environment variable {self.api_key_env}")
            self._client = openai.OpenAI(api_key=key, base_url=self.base_url)
        return self._client

    def fine_tune(self, train: Any, indices: Tensor, seed: int) -> str:
        return self.wait_job(self.start_job(train, indices, seed))

    def start_job(self, train: Any, indices: Tensor, seed: int) -> str:
        examples = as_examples(train)
        lines = [json.dumps(examples[int(i)]) for i in indices]
        upload = self.client.files.create(
            file=("daunce-member.jsonl", io.BytesIO(("\n".join(lines) + "\n").encode())), purpose="fine-tune"
        )
        job = self.client.fine_tuning.jobs.create(
            model=self.base_model,
            training_file=upload.id,
            seed=int(seed % 2**31),
            hyperparameters=self.hyperparameters or None,
        )
        return job.id

    def wait_job(self, job: str) -> str:
        job = self.client.fine_tuning.jobs.retrieve(job)
        deadline = time.monotonic() + self.timeout_seconds
        while job.status not in ("succeeded", "failed", "cancelled"):
            if time.monotonic() > deadline:
                raise DunegrassError(f"fine-tuning job {job.id} did not finish in {self.timeout_seconds:.0f} s")
            time.sleep(self.poll_seconds)
            job = self.client.fine_tuning.jobs.retrieve(job.id)
        if job.status != "succeeded" or not job.fine_tuned_model:
            raise DunegrassError(f"fine-tuning job {job.id} ended as {job.status!r}; rerun fit to retry this member")
        return job.fine_tuned_model

    def losses(self, handle: str, data: Any) -> Tensor:
        examples = as_examples(data)
        out = []
        for lo in range(0, len(examples), self.batch_size):
            batch = [examples[i] for i in range(lo, min(lo + self.batch_size, len(examples)))]
            resp = self.client.completions.create(
                model=handle,
                prompt=[ex["prompt"] + ex["completion"] for ex in batch],
                echo=True,
                max_tokens=0,
                logprobs=0,
            )
            for choice in sorted(resp.choices, key=lambda c: c.index):
                ex = batch[choice.index]
                lp = choice.logprobs
                # A token belongs to the completion when it ends after the prompt; one that straddles the
                # boundary (a prompt ending in a space, the next word starting with it) counts too.
                ends = list(lp.text_offset[1:]) + [len(ex["prompt"]) + len(ex["completion"])]
                picked = [v for v, end in zip(lp.token_logprobs, ends) if end > len(ex["prompt"]) and v is not None]
                if not picked and ex["completion"]:
                    raise DunegrassError(
                        f"the API returned no log-probabilities for the completion of example {lo + choice.index}; "
                        "it must support echo=True with logprobs on the completions endpoint"
                    )
                out.append(-sum(picked))
        return torch.tensor(out, dtype=torch.float64)

    def config(self) -> dict:
        return {
            "backend": "openai-compatible",
            "base_model": self.base_model,
            "base_url": self.base_url,
            "hyperparameters": self.hyperparameters,
        }
