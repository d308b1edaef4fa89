"""On-disk storage: atomic writes and the sharded feature store."""

from .atomic import atomic_save_npy, atomic_write_bytes, atomic_write_json
from .feature_store import FeatureStore, config_hash

__all__ = ["FeatureStore", "atomic_save_npy", "atomic_write_bytes", "atomic_write_json", "config_hash"]
