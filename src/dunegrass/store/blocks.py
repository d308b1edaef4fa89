"""A directory of numbered square blocks (the Fisher factors of a block preconditioner), one file each.

Layout::

    block-00012.npy    block 12 (float32 or float64), written atomically
    block-00012.json   written last: its shape, dtype and sha256, so a half-written block never counts

Blocks are read back one at a time and checked against their checksums. ``path=None`` keeps them in
memory; ``BlockStore.temporary()`` puts them in a private temporary directory that is removed when
the store is garbage-collected or the process exits (for blocks too many to hold in RAM).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import weakref

import numpy as np
import torch
from torch import Tensor

from ..errors import CorruptCacheError, DunegrassError
from .atomic import atomic_save_npy, atomic_write_json


class BlockStore:
    def __init__(self, path: str | os.PathLike | None):
        self.path = None if path is None else os.fspath(path)
        self._memory: dict[int, Tensor] = {}
        if self.path is not None:
            os.makedirs(self.path, exist_ok=True)

    @classmethod
    def temporary(cls) -> BlockStore:
        store = cls(tempfile.mkdtemp(prefix="dunegrass-blocks-"))
        weakref.finalize(store, shutil.rmtree, store.path, True)
        return store

    def _files(self, index: int) -> tuple[str, str]:
        stem = os.path.join(self.path, f"block-{index:05d}")
        return stem + ".npy", stem + ".json"

    def has(self, index: int) -> bool:
        return index in self._memory if self.path is None else os.path.exists(self._files(index)[1])

    def write(self, index: int, block: Tensor, info: dict | None = None) -> None:
        """``info``: what made the block (e.g. its damping), kept beside its checksum for ``dunegrass inspect``."""
        if self.path is None:
            self._memory[index] = block.detach().cpu()
            return
        data, meta = self._files(index)
        array = block.detach().cpu().numpy()
        digest = hashlib.sha256(atomic_save_npy(data, array)).hexdigest()
        record = {"index": index, "shape": list(array.shape), "dtype": str(array.dtype), "sha256": digest}
        atomic_write_json(meta, {**record, **({"info": info} if info else {})})

    def info(self, index: int) -> dict:
        """What ``write`` recorded as ``info`` for a block on disk ({} for none, or for blocks in RAM)."""
        if self.path is None:
            return {}
        with open(self._files(index)[1]) as f:
            return json.load(f).get("info", {})

    def read(self, index: int, device: torch.device | str = "cpu") -> Tensor:
        """Block ``index`` on ``device``, checked against its checksum."""
        if self.path is None:
            if index not in self._memory:
                raise DunegrassError(f"block {index} has not been computed yet; fit first")
            return self._memory[index].to(device)
        data, meta = self._files(index)
        try:
            with open(meta) as f:
                want = json.load(f)["sha256"]
            with open(data, "rb") as f:
                raw = f.read()
        except (OSError, ValueError, KeyError) as e:
            raise CorruptCacheError(
                f"block {index} in {self.path} is missing or unreadable ({e}); delete {meta}"
            ) from e
        if hashlib.sha256(raw).hexdigest() != want:
            raise CorruptCacheError(f"{data} is corrupt or truncated (checksum mismatch); delete it and {meta}")
        return torch.from_numpy(np.load(io.BytesIO(raw), allow_pickle=False)).to(device)
