"""The local torch back end: a fine-tuning service run in this process with ``train.finetune``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...errors import DunegrassError
from ...fingerprint import model_fingerprint
from ...store.signals import TensorFiles
from ...task import Task
from ...train import Member, TrainConfig
from ...train.finetune import finetune
from ...train.frozen_prefix import FrozenPrefix, KeptStates
from ...train.lora import LoraConfig
from ..base import eval_mode
from ..daunce_backends import FinetuneBackend
from .base import BlackBoxBackend


class LocalBackend(BlackBoxBackend):
    """Fine-tunes ``model`` (fully, or LoRA adapters) and evaluates ``task.loss``; members are written
    under handles ``"local-<seed>"`` to a private temporary directory (safetensors, one member in RAM
    at a time) that lives as long as this back end. The model is left as it was after every call.

    With LoRA on the last blocks (``LoraConfig(last_layers=m)``), θ₀'s hidden states below them are kept per
    example (``FrozenPrefix``) across members and loss evaluations, up to ``prefix_cache_mib`` MiB on the
    model's device for as long as this back end lives (0: recompute them), and dropped if the model's
    weights change."""

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        config: TrainConfig,
        lora: LoraConfig | None = None,
        batch_size: int = 256,
        prefix_cache_mib: int = 1024,
    ):
        self.model, self.task, self.train_config, self.lora = model, task, config, lora
        self.batch_size = batch_size
        self.members: dict[str, str] = {}  # handle -> its file's name in self.files
        self.files = TensorFiles(None)
        self.prefix_bytes = prefix_cache_mib << 20
        self.kept = KeptStates()

    def _open(self) -> FinetuneBackend:
        """A session: the model with fresh adapters and, with LoRA, θ₀'s kept states installed on it (both
        removed by the session's ``close``)."""
        kept = self.kept.for_weights(self.model)  # before the adapters: their parameters are new each time
        session = self._session()
        if self.lora is not None:
            session.prefix = FrozenPrefix.install(session.net, self.prefix_bytes, kept)
        return session

    def _session(self) -> FinetuneBackend:
        return FinetuneBackend(self.model, self.task, self.train_config, None, False, self.lora, None, 0, False)

    def fine_tune(self, train: Any, indices: Tensor, seed: int) -> str:
        handle = f"local-{seed}"
        with eval_mode(self.model):
            session = self._open()  # LoRA on the last blocks: examples seen before skip the frozen ones
            try:
                session.reset(Member(indices, seed))
                finetune(session.net, self.task, train, Member(indices, seed), self.train_config)
                # On disk: K members would otherwise hold K copies of the weights in memory.
                self.files.save(handle, session._state())
                self.members[handle] = handle
            finally:
                session.close()
        return handle

    @torch.no_grad()
    def losses(self, handle: str, data: Any) -> Tensor:
        if handle not in self.members:
            raise DunegrassError(f"no local member {handle!r}: local members live in this process's memory")
        with eval_mode(self.model):
            session = self._open()
            try:
                state = self.files.load(self.members[handle], next(self.model.parameters()).device)
                return session.evaluate([state], data, self.task.loss, self.batch_size)[0]
            finally:
                session.close()

    def has_model(self, handle: str) -> bool:
        return handle in self.members

    def config(self) -> dict:
        return {
            "backend": "local",
            "weights": model_fingerprint(self.model),  # the base model being fine-tuned
            "task": self.task.config(),
            "train_config": self.train_config.to_dict(),
            "lora": None if self.lora is None else self.lora.to_dict(),
        }
