"""An OpenAI-compatible HTTP API as Daunce's fine-tuning service (the ``openai`` client: extra ``[api]``).

Examples are ``{"prompt": str, "completion": str}`` (``"system"`` optional). A member is one fine-tuning
job on its subset, uploaded as JSONL in the format of the scoring ``protocol`` (protocols.py: ``echo`` for
completion models and servers that echo prompt log-probabilities, ``chat`` for chat models, short
answers), started with the member's seed and a ``suffix`` naming the run and the member; its signal on an
example is −log p(completion | prompt) read through that protocol.

Rate limits (429), server errors and dropped connections are retried by the client with exponential
back-off (``max_retries``), except a job's creation: a request that timed out may have created the job,
so it is looked up by its metadata before it is sent again. A failed job is reported with the service's
own message. The API key is read
from the environment (``api_key_env``) when the client is made; it is never stored, logged, or part of a
cache's configuration.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from torch import Tensor

from ...errors import DunegrassError
from .base import BlackBoxBackend, JobFailed
from .examples import PromptCompletions, as_examples
from .protocols import ScoringProtocol, make_protocol

__all__ = ["OpenAICompatibleBackend", "PromptCompletions"]

AUTO_EPOCHS = 3  # the epochs a cost estimate assumes when n_epochs is left to the service ("auto")


class OpenAICompatibleBackend(BlackBoxBackend):
    """Fine-tune ``base_model`` at ``base_url`` (default: the client's, api.openai.com) and score it with
    ``protocol`` — ``"echo"`` or ``"chat"``, chosen explicitly (protocols.py says which models take which).

    ``hyperparameters`` go to each job as they are (e.g. ``{"n_epochs": 1}``); jobs are polled every
    ``poll_seconds`` for at most ``timeout_seconds``. ``batch_size`` texts go in one echo request;
    ``max_answer_tokens`` and ``top_logprobs`` configure the chat protocol. ``max_retries`` bounds the
    client's retries (exponential back-off) of rate limits and transient errors. A back end at a
    loopback address (a local vLLM or llama.cpp server) is free; any other is paid, and BlackBoxDaunce
    asks for ``confirm=True`` before it starts more than a few jobs there.
    """

    def __init__(
        self,
        base_model: str,
        base_url: str | None = None,
        *,
        protocol: str | ScoringProtocol | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        hyperparameters: Mapping[str, Any] | None = None,
        poll_seconds: float = 10.0,
        timeout_seconds: float = 24 * 3600.0,
        batch_size: int = 16,
        max_answer_tokens: int = 4,
        top_logprobs: int = 20,
        max_retries: int = 8,
    ):
        self.base_model, self.base_url, self.api_key_env = base_model, base_url, api_key_env
        self.protocol = make_protocol(
            protocol, batch_size, max_answer_tokens=max_answer_tokens, top_logprobs=top_logprobs
        )
        self.hyperparameters = dict(hyperparameters or {})
        self.poll_seconds, self.timeout_seconds, self.max_retries = poll_seconds, timeout_seconds, int(max_retries)
        self._client = None

    @property
    def paid(self) -> bool:
        host = urlparse(self.base_url).hostname if self.base_url else None
        return host not in ("127.0.0.1", "localhost", "::1")

    @property
    def stats(self) -> dict:
        """Scoring requests made and the protocol's caveats (chat: ``floored``, ``tail_unscored``)."""
        return dict(self.protocol.stats)

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
            self._client = openai.OpenAI(api_key=key, base_url=self.base_url, max_retries=self.max_retries)
        return self._client

    def check(self, data: Any) -> None:
        self.protocol.check(as_examples(data))

    def fine_tune(self, train: Any, indices: Tensor, seed: int) -> str:
        return self.wait_job(self.start_job(train, indices, seed))

    def start_job(self, train: Any, indices: Tensor, seed: int, name: str | None = None) -> str:
        examples = as_examples(train)
        lines = [json.dumps(self.protocol.training_record(examples[int(i)])) for i in indices]
        upload = self.client.files.create(
            file=("daunce-member.jsonl", io.BytesIO(("\n".join(lines) + "\n").encode())), purpose="fine-tune"
        )
        request = {"model": self.base_model, "training_file": upload.id, "seed": int(seed % 2**31)}
        if self.hyperparameters:
            request["hyperparameters"] = self.hyperparameters
        if name:
            request.update(suffix=name, metadata={"dunegrass_job": name})
        return self._create_job(request, name)

    def _create_job(self, request: dict, name: str | None) -> str:
        """Create a job without the client's blind retries: a request that timed out may have created the job,
        so before trying again look for it by its metadata, never paying for a second one."""
        import openai

        once = self.client.with_options(max_retries=0).fine_tuning.jobs
        for attempt in range(self.max_retries + 1):
            try:
                return once.create(**request).id
            except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError):
                if attempt == self.max_retries:
                    raise
            time.sleep(min(0.5 * 2**attempt, 30.0))
            if name:
                found = self.client.fine_tuning.jobs.list(metadata={"dunegrass_job": name}, limit=1).data
                if found:
                    return found[0].id
        raise AssertionError("unreachable")

    def wait_job(self, job: str) -> str:
        job = self.client.fine_tuning.jobs.retrieve(job)
        deadline = time.monotonic() + self.timeout_seconds
        while job.status not in ("succeeded", "failed", "cancelled"):
            if time.monotonic() > deadline:
                raise DunegrassError(f"fine-tuning job {job.id} did not finish in {self.timeout_seconds:.0f} s")
            time.sleep(self.poll_seconds)
            job = self.client.fine_tuning.jobs.retrieve(job.id)
        if job.status != "succeeded" or not job.fine_tuned_model:
            error = getattr(job, "error", None)
            said = f": the service says {error.message!r}" if error is not None and error.message else ""
            raise JobFailed(
                f"fine-tuning job {job.id} ended as {job.status!r}{said}; fix the cause and rerun fit, which "
                "starts this member again (finished members are kept)"
            )
        return job.fine_tuned_model

    def losses(self, handle: str, data: Any) -> Tensor:
        return self.protocol.losses(self.client, handle, as_examples(data))

    def requests(self, n: int) -> int:
        return self.protocol.requests(n)

    def approx_tokens(self, data: Any, indices: Tensor) -> int:
        examples = as_examples(data)
        per_epoch = sum(self.protocol.approx_tokens(examples[int(i)]) for i in indices)
        epochs = self.hyperparameters.get("n_epochs")
        # "auto" (the service's default) chooses the epochs from the file's size: assume AUTO_EPOCHS, say so
        return per_epoch * (epochs if isinstance(epochs, int) else AUTO_EPOCHS)

    def config(self) -> dict:
        return {
            "backend": "openai-compatible",
            "base_model": self.base_model,
            "base_url": self.base_url,
            "hyperparameters": self.hyperparameters,
            **self.protocol.config(),
        }
