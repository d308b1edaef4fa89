"""On-disk storage: atomic writes, the sharded feature store and numbered blocks (Fisher inverses)."""

from .atomic import atomic_save_npy, atomic_write_bytes, atomic_write_json
from .blocks import BlockStore
from .feature_store import FeatureStore, config_hash, shard_rows

__all__ = [
    "BlockStore",
    "FeatureStore",
    "atomic_save_npy",
    "atomic_write_bytes",
    "atomic_write_json",
    "config_hash",
    "shard_rows",
]
