"""Learned masks cached under a fit's ``cache_dir``, keyed by what they were learned from.

A directory holds one sub-directory per mask (``SelectiveMask.save``) and ``key.json`` with the hash
of the key (data, weights, mask settings), written last so that its presence means complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

from ..compress import SelectiveMask
from ..errors import ConfigMismatchError
from ..store import atomic_write_json, config_hash


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
