"""Learned masks (GraSS's, FactGraSS's) cached under a fit's ``cache_dir``, keyed by what they were learned from.

A directory holds one sub-directory per mask (``SelectiveMask.save``) and ``key.json`` with the hash
of the key (data, weights, mask settings), written last so that its presence means complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .. import distributed
from ..compress import SelectiveMask
from ..data import iterate_batches, subset
from ..errors import ConfigMismatchError, DunegrassError
from ..fingerprint import RowHasher, hashed_per_shard
from ..store import atomic_write_json, config_hash

MASK_FIT_BYTES = 2 << 30  # bound on the per-example gradients materialised to learn selective masks


def mask_examples(data: Any, n: int, seed: int, batch_size: int, sort: bool) -> tuple[Any, str | None]:
    """The ``n`` seeded random training examples masks are learned from, and their digest when the data's own
    fingerprint does not cover them (a dataset read lazily): the masks' key must change when they do."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    chosen = subset(data, order.sort().values if sort else order)
    if not hashed_per_shard(data):
        return chosen, None
    rows = RowHasher()
    for _, batch in iterate_batches(chosen, batch_size):
        rows.update(batch)
    return chosen, rows.hexdigest()


def check_fit_bytes(need: int, what: str, fixes: str) -> None:
    """Refuse to materialise more than MASK_FIT_BYTES of gradients to learn masks (``what`` needs ``need``)."""
    if need > MASK_FIT_BYTES:
        raise DunegrassError(f"learning selective masks materialises {what} ({need / 2**30:.1f} GiB); {fixes}")


def learned_masks(
    path: str | None, key: dict, names: Iterable[str], learn: Callable[[], dict[str, SelectiveMask]]
) -> dict[str, SelectiveMask]:
    """The masks ``names`` cached at ``path`` for ``key``, or ``learn()`` them and cache them there."""
    names = list(names)
    if distributed.active() and path is not None:  # rank 0 learns them, the others wait and read its files
        if distributed.rank() == 0 and load_masks(path, key, names) is None:
            save_masks(path, key, learn())
        distributed.barrier()
    masks = load_masks(path, key, names)
    if masks is None:
        masks = learn()
        save_masks(path, key, masks)
    return masks


def load_masks(path: str | None, key: dict, names: Iterable[str]) -> dict[str, SelectiveMask] | None:
    """The masks ``names`` cached at ``path`` for ``key``; None when nothing is cached there."""
    if path is None or not os.path.exists(os.path.join(path, "key.json")):
        return None
    with open(os.path.join(path, "key.json")) as f:
        found = json.load(f)
    if found.get("hash") != config_hash(key):
        raise ConfigMismatchError(
            f"the selective masks cached at {path} were learned with another configuration (data, weights or "
            "mask settings); use another cache_dir, or delete that directory to relearn them"
        )
    return {name: SelectiveMask.load(os.path.join(path, name)) for name in names}


def save_masks(path: str | None, key: dict, masks: Mapping[str, SelectiveMask]) -> None:
    """Write ``masks`` (name -> mask) under ``path``, then the key; a no-op without a path."""
    if path is None:
        return
    for name, mask in masks.items():
        mask.save(os.path.join(path, name))
    atomic_write_json(os.path.join(path, "key.json"), {"hash": config_hash(key), "key": key})
