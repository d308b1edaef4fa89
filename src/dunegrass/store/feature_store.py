"""On-disk feature store: fixed-size shards of named arrays plus a JSON manifest.

Layout of a store directory::

    manifest.json          config, its hash, n, shard size, and per array its width and dtype
    shard-00003.json       written last for shard 3: row range and sha256 of each array file
    features-00003.npy     arrays of shard 3 (rows [3·S, 4·S)), one .npy per named array

Each file is written atomically, and a shard counts as complete only once its JSON exists and its
checksums match, so a killed writer leaves nothing half-written: ``missing()`` lists what to
(re)compute, and resuming gives bit-identical results. Per-shard JSON files (instead of one
manifest updated by everyone) let several processes write disjoint shards of one store.

``path=None`` keeps the shards in memory with the same interface (``n × Σ width`` numbers in RAM);
on disk, reading holds one shard at a time (``shard_rows`` bounds a shard's bytes), and ``columns``
reads a column range of every shard through a memory map, so a per-layer pass touches that layer only.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from .. import distributed
from ..errors import ConfigMismatchError, CorruptCacheError, DunegrassError
from .atomic import atomic_save_npy, atomic_write_json

FORMAT = "dunegrass-feature-store-v1"
DTYPES = ("float32", "float16", "float64")
SHARD_BYTES = 256 << 20  # a shard is written from, and read into, memory whole: bound its size


def shard_rows(row_bytes: int, limit: int = 1024) -> int:
    """Rows per shard: at most ``limit``, and at most SHARD_BYTES of ``row_bytes`` rows (at least one)."""
    return max(1, min(limit, SHARD_BYTES // max(1, row_bytes)))


def config_hash(config: Mapping) -> str:
    """sha256 of the canonical JSON of ``config``."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


class FeatureStore:
    """Rows ``[0, n)`` of named arrays, each ``[n, width]``, stored in shards of ``shard_size`` rows.

    ``growable``: n may differ from the cache's (rows are defined independently of n, as Daunce's
    members are): complete shards are kept, a shard whose rows changed is recomputed.
    """

    def __init__(
        self,
        path: str | os.PathLike | None,
        config: Mapping,
        n: int,
        widths: Mapping[str, int],
        shard_size: int = 1024,
        dtypes: Mapping[str, str] | None = None,
        growable: bool = False,
    ):
        if n < 1:
            raise DunegrassError("a feature store needs at least one row; the dataset is empty")
        if shard_size < 1:
            raise DunegrassError(f"shard_size must be at least 1, got {shard_size}")
        dtypes = dict(dtypes or {})
        for name, dt in dtypes.items():
            if dt not in DTYPES:
                raise DunegrassError(f"unsupported store dtype {dt!r} for {name!r}; choose one of {DTYPES}")
        self.path = None if path is None else os.fspath(path)
        self.manifest = {
            "format": FORMAT,
            "config": json.loads(json.dumps(config, sort_keys=True, default=str)),
            "config_hash": config_hash(config),
            "n": int(n),
            "shard_size": int(shard_size),
            "arrays": {k: {"width": int(w), "dtype": dtypes.get(k, "float32")} for k, w in widths.items()},
        }
        self.growable = growable
        self._memory: dict[int, dict[str, np.ndarray]] = {}
        self._verified: set[tuple[int, str]] = set()  # (shard, array) files this object has checked
        if self.path is not None:
            self._open_dir()

    # ---- layout
    @property
    def n(self) -> int:
        return self.manifest["n"]

    @property
    def shard_size(self) -> int:
        return self.manifest["shard_size"]

    @property
    def num_shards(self) -> int:
        return -(-self.n // self.shard_size)

    def dtype(self, name: str) -> str:
        """The stored dtype of array ``name`` (``"float32"``, ...)."""
        return self.manifest["arrays"][name]["dtype"]

    def rows(self, index: int) -> tuple[int, int]:
        lo = index * self.shard_size
        return lo, min(lo + self.shard_size, self.n)

    def _file(self, name: str, index: int) -> str:
        return os.path.join(self.path, f"{name}-{index:05d}.npy")

    def _meta_file(self, index: int) -> str:
        return os.path.join(self.path, f"shard-{index:05d}.json")

    def _open_dir(self) -> None:
        os.makedirs(self.path, exist_ok=True)
        mpath = os.path.join(self.path, "manifest.json")
        if distributed.world_size() == 1:  # other ranks may be mid-write; their temp files are not leftovers
            for leftover in os.listdir(self.path):
                if leftover.startswith(".tmp-"):
                    os.unlink(os.path.join(self.path, leftover))
        if os.path.exists(mpath):
            try:
                with open(mpath) as f:
                    found = json.load(f)
            except (OSError, ValueError) as e:
                raise CorruptCacheError(
                    f"{mpath} is unreadable ({e}); delete the directory {self.path} to recompute"
                ) from e
            resized = found.get("n") != self.n
            if found.get("config_hash") != self.manifest["config_hash"] or (resized and not self.growable):
                diff = _diff(found.get("config", {}), self.manifest["config"])
                raise ConfigMismatchError(
                    f"the cache at {self.path} was made with a different configuration ({diff}); "
                    "use another cache_dir, or delete this one to recompute"
                )
            if found.get("shard_size") != self.shard_size or found.get("arrays") != self.manifest["arrays"]:
                raise ConfigMismatchError(
                    f"the cache at {self.path} has a different layout (shard size or arrays); "
                    "use another cache_dir, or delete this one to recompute"
                )
            if resized:  # rows are independent of n (Daunce's members): a shard whose rows changed is redone
                atomic_write_json(mpath, self.manifest)
        else:
            atomic_write_json(mpath, self.manifest)

    # ---- writing
    def missing(self) -> list[int]:
        """Indices of shards that are not complete yet (in a growable store, also those written for other rows:
        the last, partial shard of a smaller n)."""
        if self.path is None:
            return [i for i in range(self.num_shards) if i not in self._memory]
        return [i for i in range(self.num_shards) if not self._done(i)]

    def _done(self, index: int) -> bool:
        if not os.path.exists(self._meta_file(index)):
            return False
        if not self.growable:
            return True
        try:
            with open(self._meta_file(index)) as f:
                return json.load(f).get("rows") == list(self.rows(index))
        except (OSError, ValueError):
            return False

    @property
    def complete(self) -> bool:
        return not self.missing()

    def write(self, index: int, arrays: Mapping[str, np.ndarray], data_digest: str | None = None) -> None:
        """Store shard ``index``; ``arrays`` maps every array name to ``[rows, width]``. ``data_digest``
        (a hash of the examples the rows were computed from) is recorded for ``check_data``."""
        lo, hi = self.rows(index)
        out = {}
        for name, spec in self.manifest["arrays"].items():
            if name not in arrays:
                raise DunegrassError(f"shard {index} is missing array {name!r}")
            a = np.asarray(arrays[name])
            if a.shape != (hi - lo, spec["width"]):
                raise DunegrassError(
                    f"shard {index} array {name!r} has shape {a.shape}, expected {(hi - lo, spec['width'])}"
                )
            out[name] = a.astype(spec["dtype"], copy=False)
        if self.path is None:
            self._memory[index] = {k: v.copy() for k, v in out.items()}
            return
        sums = {}
        for name, a in out.items():
            sums[name] = hashlib.sha256(atomic_save_npy(self._file(name, index), a)).hexdigest()
        meta = {"index": index, "rows": [lo, hi], "sha256": sums, "data_sha256": data_digest}
        atomic_write_json(self._meta_file(index), meta)
        self._verified.update((index, name) for name in out)

    def data_digest(self) -> str | None:
        """One digest of the examples every shard was computed from (None when no shard recorded one, as for
        data hashed whole in the config): what the Fisher's factors and other derived files are keyed by."""
        if self.path is None:
            return None
        digests = []
        for i in range(self.num_shards):
            with open(self._meta_file(i)) as f:
                digests.append(json.load(f).get("data_sha256"))
        return None if all(d is None for d in digests) else hashlib.sha256(json.dumps(digests).encode()).hexdigest()

    def check_data(self, index: int, data_digest: str) -> None:
        """Raise ConfigMismatchError if shard ``index`` was computed from other examples than those hashing to
        ``data_digest`` (a dataset read lazily can change under a cache without changing its length)."""
        if self.path is None:
            return
        try:
            with open(self._meta_file(index)) as f:
                recorded = json.load(f).get("data_sha256")
        except (OSError, ValueError) as e:
            raise CorruptCacheError(f"{self._meta_file(index)} is unreadable ({e}); delete it to recompute") from e
        if recorded is not None and recorded != data_digest:
            lo, hi = self.rows(index)
            raise ConfigMismatchError(
                f"training examples {lo}..{hi - 1} differ from those the cache at {self.path} was computed from "
                "(the dataset changed); use another cache_dir, or delete this one to recompute"
            )

    # ---- reading
    def read(self, index: int, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Shard ``index``'s arrays (all, or ``names``), checked against their recorded checksums."""
        names = list(self.manifest["arrays"]) if names is None else list(names)
        if self.path is None:
            if index not in self._memory:
                raise DunegrassError(f"shard {index} has not been computed yet")
            return {name: self._memory[index][name] for name in names}
        meta_file = self._meta_file(index)
        if not os.path.exists(meta_file):
            raise DunegrassError(f"shard {index} of {self.path} has not been computed yet; run fit first")
        try:
            with open(meta_file) as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise CorruptCacheError(f"{meta_file} is unreadable ({e}); delete it to recompute the shard") from e
        out = {}
        for name in names:
            fname = self._file(name, index)
            try:
                with open(fname, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise CorruptCacheError(
                    f"{fname} is missing ({e}); delete {meta_file} to recompute shard {index}"
                ) from e
            if hashlib.sha256(data).hexdigest() != meta["sha256"].get(name):
                raise CorruptCacheError(
                    f"{fname} is corrupt or truncated (checksum mismatch); delete it and {meta_file} "
                    f"to recompute shard {index}"
                )
            out[name] = np.load(io.BytesIO(data), allow_pickle=False)
        lo, hi = self.rows(index)
        for name, a in out.items():
            if a.shape != (hi - lo, self.manifest["arrays"][name]["width"]):
                raise CorruptCacheError(f"{self._file(name, index)} has the wrong shape {a.shape}")
        self._verified.update((index, name) for name in out)
        return out

    def columns(self, start: int, stop: int, name: str = "features") -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_row, array [rows, stop - start])``: columns ``[start, stop)`` of ``name``, shard by
        shard. On disk each shard is checked against its checksums once per store object, then read
        through a memory map, so only the pages of those columns are touched."""
        for i in range(self.num_shards):
            if self.path is None or (i, name) not in self._verified:
                yield self.rows(i)[0], np.ascontiguousarray(self.read(i, [name])[name][:, start:stop])
                continue
            try:
                mapped = np.load(self._file(name, i), mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise CorruptCacheError(f"{self._file(name, i)} is unreadable ({e}); delete it to recompute") from e
            yield self.rows(i)[0], np.array(mapped[:, start:stop])  # a copy: the map is read-only
            del mapped

    def iter_shards(self, name: str = "features") -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_row, array)`` shard by shard, so memory stays flat as n grows."""
        for i in range(self.num_shards):
            yield self.rows(i)[0], self.read(i, [name])[name]

    def load(self, name: str = "features") -> np.ndarray:
        """The whole ``[n, width]`` array (for small stores)."""
        return np.concatenate([a for _, a in self.iter_shards(name)])


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + " …"


# what a fingerprint's change means, beside its hashes
_MEANING = {
    "data": " — the training data differ",
    "weights": " — the model's weights (or a checkpoint's) differ",
    "queries": " — the queries differ",
}


def _diff(old: Any, new: Any, prefix: str = "") -> str:
    """The first setting that differs, by its path (``featurizer.layers[0].proj_in.out_dim: cached 8, ...``)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        pairs = [(f"{prefix}{'.' if prefix else ''}{k}", old.get(k), new.get(k)) for k in sorted(set(old) | set(new))]
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        pairs = [(f"{prefix}[{i}]", a, b) for i, (a, b) in enumerate(zip(old, new))]
    else:
        said = _MEANING.get(prefix, "")
        return f"{prefix}: cached {_short(old)}, requested {_short(new)}{said}"
    for path, a, b in pairs:
        if a != b:
            return _diff(a, b, path)
    return "layout differs"
