"""``dunegrass inspect CACHE_DIR``: what a cache holds, its config, and whether every file checks out.

Walks the directory for the stores dunegrass writes — feature and signal stores (``manifest.json`` and
one checksummed file per shard), Fisher blocks (``block-*.json``), Daunce's members
(``member-*.safetensors`` with their checksums) and learned masks — reads every file back against its
checksum, and prints one line per store. Exit status 1 when anything is missing or corrupt.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

from ..errors import DunegrassError
from ..store import BlockStore, FeatureStore
from ..store.signals import TensorFiles


def inspect_cache(root: str) -> list[dict]:
    """One entry per store under ``root``: ``{"path", "kind", "summary", "problems"}``."""
    if not os.path.isdir(root):
        raise DunegrassError(f"{root} is not a directory; pass a cache_dir that dunegrass wrote")
    found = []
    for path, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        if "manifest.json" in files:
            found.append(_feature_store(path))
        if any(f.startswith("block-") and f.endswith(".json") for f in files):
            found.append(_blocks(path, files))
        if any(f.startswith("member-") and f.endswith(".safetensors") for f in files):
            found.append(_members(path, files))
    return found


def _feature_store(path: str) -> dict:
    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    arrays = manifest["arrays"]
    store = FeatureStore(
        path,
        manifest["config"],
        manifest["n"],
        {k: v["width"] for k, v in arrays.items()},
        manifest["shard_size"],
        {k: v["dtype"] for k, v in arrays.items()},
        growable=True,
    )
    problems = _check(store.read, [i for i in range(store.num_shards) if i not in store.missing()])
    missing = store.missing()
    widths = ", ".join(f"{k} {v['width']} ({v['dtype']})" for k, v in arrays.items())
    summary = f"{manifest['n']} rows of {widths}; {store.num_shards - len(missing)} of {store.num_shards} shards done"
    if missing:
        problems.append(f"{len(missing)} shard(s) not computed yet: fit again to finish")
    kind = "signals" if "signal" in arrays else "features"
    return {"path": path, "kind": kind, "summary": summary, "config": manifest["config"], "problems": problems}


def _blocks(path: str, files: list[str]) -> dict:
    store = BlockStore(path)
    indices = sorted(int(f[6:11]) for f in files if f.startswith("block-") and f.endswith(".json"))
    problems = _check(store.read, indices)
    summary = f"{len(indices)} factorised blocks"
    with contextlib.suppress(OSError, ValueError):  # an unreadable record is already among the problems
        ratios = sorted(r for i in indices if (r := store.info(i).get("damping")) is not None)
        if ratios:
            spread = f"{ratios[0]:.3g}" if ratios[0] == ratios[-1] else f"{ratios[0]:.3g}–{ratios[-1]:.3g}"
            summary += f", relative damping {spread}"
    return {"path": path, "kind": "Fisher blocks", "summary": summary, "problems": problems}


def _members(path: str, files: list[str]) -> dict:
    store = TensorFiles(path)
    names = sorted(f[: -len(".safetensors")] for f in files if f.endswith(".safetensors"))
    problems = _check(lambda name: store.load(name, "cpu", "delete it to retrain that member"), names)
    return {"path": path, "kind": "members", "summary": f"{len(names)} member weight files", "problems": problems}


def _check(read, keys) -> list[str]:
    problems = []
    for key in keys:
        try:
            read(key)
        except DunegrassError as e:
            problems.append(str(e))
    return problems


def main(root: str) -> int:
    try:
        found = inspect_cache(root)
    except DunegrassError as e:
        print(f"dunegrass inspect: {e}", file=sys.stderr)
        return 1
    run = os.path.join(root, "run.json")
    if os.path.exists(run):
        with open(run) as f:
            config = json.load(f)["config"]
        print(f"{root}: a {config['method']} run of {config['model']} on {config['data']}")
    if not found:
        print(f"{root} holds no dunegrass store")
        return 1
    bad = 0
    for entry in found:
        status = "ok" if not entry["problems"] else f"{len(entry['problems'])} problem(s)"
        print(f"  {os.path.relpath(entry['path'], root):<40} {entry['kind']:<14} {entry['summary']}  [{status}]")
        for problem in entry["problems"]:
            print(f"      {problem}")
        bad += bool(entry["problems"])
    print("every file checks out" if not bad else f"{bad} store(s) with problems")
    return 1 if bad else 0
