"""Signals store for ensemble methods (Daunce): one row of per-example signals per trained model.

Layout of a store directory::

    train/                 FeatureStore with K rows of width n_train (row k = model k's signals)
    queries-<hash>/        the same for one query set, keyed by that set's fingerprint
    weights/member-00012.pt   the trained tensors of member 12 (optional; tensors only, no pickle)
    handles/member-00012.json the id of member 12 at a fine-tuning service (black-box members)

Rows are written as each member (or vmapped group of members) finishes; a row counts once its
shard's JSON exists and its checksums match (FeatureStore), so a killed run resumes at the next
unfinished member. Member weights let queries that were not known at fit time be scored later
without retraining. ``path=None`` keeps everything in memory with the same interface.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from ..errors import CorruptCacheError, DunegrassError
from .atomic import atomic_write_bytes, atomic_write_json
from .feature_store import FeatureStore, config_hash

# float64: signals differ across models by far less than their size (an LM loss of 3 moving by 1e-4)
F64 = {"signal": "float64"}


class SignalStore:
    """Signal rows ``[K, n_train]`` (and ``[K, n_query]`` per query set) plus optional member weights.

    ``group_size`` is how many members are written together (one vmapped group, or 1 for
    member-by-member training); it is part of the layout.
    """

    def __init__(
        self,
        path: str | os.PathLike | None,
        config: Mapping,
        num_models: int,
        n_train: int,
        group_size: int = 1,
    ):
        if num_models < 1:
            raise DunegrassError(f"a signal store needs at least one model, got {num_models}")
        self.path = None if path is None else os.fspath(path)
        self.config = dict(config)
        self.hash = config_hash(self.config)
        self.num_models, self.group_size = int(num_models), int(group_size)
        self.train = FeatureStore(self._sub("train"), self.config, num_models, {"signal": n_train}, group_size, F64)
        self._queries: dict[str, FeatureStore] = {}
        self._weights: dict[int, dict[str, Tensor]] = {}
        self._handles: dict[int, str] = {}

    def _sub(self, name: str) -> str | None:
        return None if self.path is None else os.path.join(self.path, name)

    # ---- groups of members
    def groups(self) -> list[tuple[int, int]]:
        """``[(lo, hi)]`` member ranges that share one shard, in order."""
        return [self.train.rows(i) for i in range(self.train.num_shards)]

    def missing_groups(self) -> list[tuple[int, int]]:
        """Member ranges whose training-set signals are not stored yet."""
        return [self.train.rows(i) for i in self.train.missing()]

    @property
    def complete(self) -> bool:
        return self.train.complete

    # ---- query sets
    def query_store(self, fingerprint: str, n_query: int) -> FeatureStore:
        """The store of one query set's signals (created empty on first use)."""
        key = config_hash({"store": self.hash, "queries": fingerprint})[:16]
        if key not in self._queries:
            cfg = {"store": self.hash, "queries": fingerprint}
            self._queries[key] = FeatureStore(
                self._sub(f"queries-{key}"), cfg, self.num_models, {"signal": n_query}, self.group_size, F64
            )
        return self._queries[key]

    # ---- writing
    def write_group(
        self,
        lo: int,
        train_rows: np.ndarray | Tensor,
        query_rows: Mapping[str, tuple[FeatureStore, np.ndarray | Tensor]] | None = None,
        weights: list[Mapping[str, Tensor]] | None = None,
    ) -> None:
        """Store members ``[lo, lo + len(train_rows))``: weights first, then query rows, then the
        training rows, whose shard marks the group as done (so a crash never leaves a done group
        without its weights or queries)."""
        index = lo // self.group_size
        if lo % self.group_size:
            raise DunegrassError(f"member {lo} does not start a group of {self.group_size}")
        for j, state in enumerate(weights or []):
            self.save_weights(lo + j, state)
        for store, rows in (query_rows or {}).values():
            store.write(index, {"signal": _numpy(rows)})
        self.train.write(index, {"signal": _numpy(train_rows)})

    def save_weights(self, member: int, state: Mapping[str, Tensor]) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        if self.path is None:
            self._weights[member] = tensors
            return
        buf = io.BytesIO()
        torch.save(tensors, buf)
        atomic_write_bytes(self._weights_file(member), buf.getvalue())

    # ---- reading
    def _weights_file(self, member: int) -> str:
        return os.path.join(self.path, "weights", f"member-{member:05d}.pt")

    def has_weights(self, member: int) -> bool:
        if self.path is None:
            return member in self._weights
        return os.path.exists(self._weights_file(member))

    def load_weights(self, member: int) -> dict[str, Tensor]:
        if self.path is None:
            if member not in self._weights:
                raise DunegrassError(f"the weights of member {member} were not kept")
            return self._weights[member]
        fname = self._weights_file(member)
        try:
            state = torch.load(fname, map_location="cpu", weights_only=True)
        except FileNotFoundError as e:
            raise DunegrassError(f"the weights of member {member} were not kept ({fname} is missing)") from e
        except Exception as e:  # torch raises several types for a truncated or foreign file
            raise CorruptCacheError(f"{fname} is unreadable ({e}); delete the cache directory to retrain") from e
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise CorruptCacheError(f"{fname} does not hold a dict of tensors; delete it to retrain")
        return state

    # ---- model handles (black-box members: an id at a fine-tuning service instead of weights)
    def _handle_file(self, member: int) -> str:
        return os.path.join(self.path, "handles", f"member-{member:05d}.json")

    def save_handle(self, member: int, handle: str) -> None:
        if self.path is None:
            self._handles[member] = handle
            return
        atomic_write_json(self._handle_file(member), {"member": member, "handle": handle})

    def has_handle(self, member: int) -> bool:
        if self.path is None:
            return member in self._handles
        return os.path.exists(self._handle_file(member))

    def load_handle(self, member: int) -> str:
        if self.path is None:
            if member not in self._handles:
                raise DunegrassError(f"member {member} has no model handle yet")
            return self._handles[member]
        try:
            with open(self._handle_file(member)) as f:
                return json.load(f)["handle"]
        except FileNotFoundError as e:
            raise DunegrassError(f"member {member} has no model handle yet; run fit") from e
        except (ValueError, KeyError) as e:
            raise CorruptCacheError(
                f"{self._handle_file(member)} is unreadable ({e}); delete it to redo the member"
            ) from e

    def train_signals(self) -> Tensor:
        """``[K, n_train]`` float64."""
        return torch.from_numpy(self.train.load("signal"))


def _numpy(rows: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(rows, Tensor):
        rows = rows.detach().cpu().to(torch.float64).numpy()
    return np.asarray(rows, dtype=np.float64)
