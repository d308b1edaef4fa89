"""Signals store for ensemble methods (Daunce): one row of per-example signals per trained model.

Layout of a store directory::

    train/                            FeatureStore with K rows of width n_train (row k = model k's signals)
    queries-<hash>/                   the same for one query set, keyed by that set's fingerprint
    weights/member-00012.safetensors  the trained tensors of member 12 (optional)
    weights/member-00012.json         its sha256, written after it: the member is kept once this exists
    handles/member-00012.json         the id of member 12 at a fine-tuning service (black-box members)

Rows are written as each member (or vmapped group of members) finishes; a row counts once its
shard's JSON exists and its checksums match (FeatureStore), so a killed run resumes at the next
unfinished member. Member weights let queries that were not known at fit time be scored later
without retraining; they go to disk as each member finishes, and are checked against their
checksum when loaded. Bounds: RAM one member (one vmapped group) at a time; disk K × member size.

``path=None`` keeps the signals and handles in memory with the same interface, and the member
weights in a private temporary directory, removed when the store is garbage-collected (with the
attributor that holds it) or the process exits.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import Tensor

from ..errors import ConfigMismatchError, CorruptCacheError, DunegrassError
from .atomic import atomic_write_bytes, atomic_write_json
from .feature_store import FeatureStore, config_hash

# float64: signals differ across models by far less than their size (an LM loss of 3 moving by 1e-4)
F64 = {"signal": "float64"}
HASH_BLOCK = 1 << 20


def file_sha256(path: str) -> str:
    """sha256 of a file, read in 1 MiB blocks (a member's weights are never read whole for it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


class TensorFiles:
    """Dicts of tensors by name, one safetensors file each, with its sha256 in a JSON beside it.

    ``<name>.safetensors`` is written (atomically) before ``<name>.json``, so a name exists once its
    JSON does; loading checks the file against the recorded checksum. ``directory=None``: a private
    temporary directory, removed when this object is garbage-collected or the process exits.
    """

    def __init__(self, directory: str | os.PathLike | None):
        self._directory = None if directory is None else os.fspath(directory)

    @property
    def directory(self) -> str:
        if self._directory is None:  # made on first use: a store that keeps no weights leaves nothing behind
            self._directory = tempfile.mkdtemp(prefix="dunegrass-members-")
            # Not a method of self: finalize must not keep this object alive.
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._directory, ignore_errors=True)
        return self._directory

    def file(self, name: str) -> str:
        return os.path.join(self.directory, f"{name}.safetensors")

    def _meta(self, name: str) -> str:
        return os.path.join(self.directory, f"{name}.json")

    def has(self, name: str) -> bool:
        return os.path.exists(self._meta(name))

    def save(self, name: str, state: Mapping[str, Tensor]) -> None:
        """Write ``state`` (any device) as ``<name>.safetensors``, then its checksum."""
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        data = safetensors.torch.save(tensors)
        atomic_write_bytes(self.file(name), data)
        atomic_write_json(self._meta(name), {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})

    def load(self, name: str, device: torch.device | str = "cpu", fix: str = "delete it") -> dict[str, Tensor]:
        """The tensors of ``name`` on ``device``, after checking the file's checksum (``fix``: what to
        tell the user to do about a corrupt file)."""
        fname, meta_file = self.file(name), self._meta(name)
        try:
            with open(meta_file) as f:
                want = json.load(f)["sha256"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CorruptCacheError(f"{meta_file} is unreadable ({e}); {fix}") from e
        try:
            found = file_sha256(fname)
        except FileNotFoundError as e:
            raise CorruptCacheError(f"{fname} is missing although {meta_file} records it; {fix}") from e
        if found != want:
            raise CorruptCacheError(f"{fname} is corrupt or truncated (checksum mismatch); {fix}")
        try:
            return safetensors.torch.load_file(fname, device=str(torch.device(device)))
        except (safetensors.SafetensorError, OSError, RuntimeError) as e:
            raise CorruptCacheError(f"{fname} is unreadable ({e}); {fix}") from e


class SignalStore:
    """Signal rows ``[K, n_train]`` (and ``[K, n_query]`` per query set) plus optional member weights.

    One shard per member, so the layout does not depend on K (a cache grows or shrinks with it: member k
    is the same for any K) nor on how members are grouped for training; ``group_size`` only says how
    missing members are grouped (aligned groups ``[g·G, (g+1)·G)``, one vmapped group, or 1 member by
    member).
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
        self.num_models, self.group_size, self.n_train = int(num_models), int(group_size), int(n_train)
        if self.path is not None:
            _refuse_old_layout(self.path)
        self.train = FeatureStore(
            self._sub("train"), self.config, num_models, {"signal": n_train}, 1, F64, growable=True
        )
        self._queries: dict[str, FeatureStore] = {}
        self.weights = TensorFiles(self._sub("weights"))
        self._handles: dict[int, str] = {}

    def _sub(self, name: str) -> str | None:
        return None if self.path is None else os.path.join(self.path, name)

    # ---- groups of members
    def runs(self, members: list[int]) -> list[tuple[int, int]]:
        """``members`` as contiguous ranges ``[(lo, hi)]``, each inside one aligned group of ``group_size``."""
        out: list[tuple[int, int]] = []
        for k in sorted(members):
            if out and out[-1][1] == k and k % self.group_size:
                out[-1] = (out[-1][0], k + 1)
            else:
                out.append((k, k + 1))
        return out

    def missing_groups(self) -> list[tuple[int, int]]:
        """Member ranges whose training-set signals are not stored yet."""
        return self.runs(self.train.missing())

    @property
    def complete(self) -> bool:
        return self.train.complete

    # ---- query sets
    def query_store(self, fingerprint: str, n_query: int) -> FeatureStore:
        """The store of one query set's signals, one shard per member (created empty on first use)."""
        key = config_hash({"store": self.hash, "queries": fingerprint})[:16]
        if key not in self._queries:
            cfg = {"store": self.hash, "queries": fingerprint}
            self._queries[key] = FeatureStore(
                self._sub(f"queries-{key}"), cfg, self.num_models, {"signal": n_query}, 1, F64, growable=True
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
        """Store members ``[lo, lo + len(train_rows))``, member by member: its weights, then its query rows,
        then its training row, which marks it done (so a crash never leaves a done member without its
        weights or queries)."""
        train_rows = _numpy(train_rows)
        queries = [(store, _numpy(rows)) for store, rows in (query_rows or {}).values()]
        for j in range(len(train_rows)):
            if weights:
                self.save_weights(lo + j, weights[j])
            for store, rows in queries:
                store.write(lo + j, {"signal": rows[j : j + 1]})
            self.train.write(lo + j, {"signal": train_rows[j : j + 1]})

    def save_weights(self, member: int, state: Mapping[str, Tensor]) -> None:
        """Write member ``member``'s tensors (from any device) to disk with their checksum."""
        self.weights.save(_member(member), state)

    # ---- reading
    def has_weights(self, member: int) -> bool:
        return self.weights.has(_member(member))

    def load_weights(self, member: int, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """Member ``member``'s tensors on ``device``, checked against their recorded checksum."""
        if not self.has_weights(member):
            where = "" if self.path is None else f" ({self.weights.file(_member(member))} is missing)"
            raise DunegrassError(f"the weights of member {member} were not kept{where}")
        if self.path is None:
            fix = "fit again to retrain the members"
        else:
            fix = (
                f"delete it and {self.train._meta_file(member)} to retrain member {member} at the next fit "
                f"(or delete the cache directory {self.path} to start over)"
            )
        return self.weights.load(_member(member), device, fix)

    # ---- model handles (black-box members: an id at a fine-tuning service instead of weights)
    def _handle_file(self, member: int) -> str:
        return os.path.join(self.path, "handles", f"member-{member:05d}.json")

    def save_handle(self, member: int, handle: str) -> None:
        if self.path is None:
            self._handles[member] = handle
            return
        atomic_write_json(self._handle_file(member), {"member": member, "handle": handle})

    def forget_handle(self, member: int) -> None:
        """Drop a member's handle (its job failed): the next fit starts that member again."""
        if self.path is None:
            self._handles.pop(member, None)
        elif os.path.exists(self._handle_file(member)):
            os.remove(self._handle_file(member))

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
        """``[K, n_train]`` float64 (the whole matrix; ``train_chunks`` reads it a few columns at a time)."""
        return torch.from_numpy(self.train.load("signal"))

    def train_chunks(self, columns: int) -> Iterator[tuple[int, Tensor]]:
        """``(start, A[:, start:start + columns])`` over the training examples, ``A [K, n_train]`` float64.

        Read through ``FeatureStore.columns``: a shard is checked against its checksum the first time this
        store reads it (that shard, ``group_size × n_train``, in RAM for the check), then memory-mapped, so
        a chunk costs K × ``columns`` numbers in RAM whatever n_train is.
        """
        if columns < 1:
            raise DunegrassError(f"a chunk needs at least one column, got {columns}")
        for start in range(0, self.n_train, columns):
            stop = min(start + columns, self.n_train)
            parts = [rows for _, rows in self.train.columns(start, stop, "signal")]
            yield start, torch.from_numpy(np.concatenate(parts))


def _member(member: int) -> str:
    return f"member-{member:05d}"


def _refuse_old_layout(path: str) -> None:
    old = glob.glob(os.path.join(path, "weights", "member-*.pt"))
    if old:
        raise ConfigMismatchError(
            f"the cache at {path} keeps member weights as .pt files ({os.path.basename(old[0])}, an older "
            "dunegrass layout), which this version no longer reads; delete that cache directory to retrain "
            "the members, or use another cache_dir"
        )


def _numpy(rows: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(rows, Tensor):
        rows = rows.detach().cpu().to(torch.float64).numpy()
    return np.asarray(rows, dtype=np.float64)
