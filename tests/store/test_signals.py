"""SignalStore: member weights as checksummed safetensors files, on disk or in a private temporary
directory, and the training signals read chunk by chunk of columns."""

import gc
import json
import os

import numpy as np
import pytest
import torch

import dunegrass as dg
from dunegrass.errors import ConfigMismatchError, CorruptCacheError
from dunegrass.methods.daunce import Daunce
from dunegrass.store.signals import SignalStore


def _state(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"layer.weight": torch.randn(5, 3, generator=gen), "layer.bias": torch.randn(5, generator=gen)}


def _store(path, K=4, n=10, group=2):
    return SignalStore(path, {"test": 1}, K, n, group)


def test_weights_are_safetensors_files_with_their_checksum(tmp_path, device):
    store = _store(tmp_path)
    state = {k: v.to(device) for k, v in _state().items()}
    store.save_weights(3, state)
    weights = tmp_path / "weights"
    assert sorted(os.listdir(weights)) == ["member-00003.json", "member-00003.safetensors"]
    meta = json.loads((weights / "member-00003.json").read_text())
    import hashlib

    data = (weights / "member-00003.safetensors").read_bytes()
    assert meta["sha256"] == hashlib.sha256(data).hexdigest() and meta["bytes"] == len(data)
    assert data[8:9] == b"{"  # a safetensors header (8-byte length, then JSON), not a pickle
    loaded = store.load_weights(3, device)
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert loaded[k].device == v.device
        assert torch.equal(loaded[k].cpu(), v.cpu())
    assert store.has_weights(3) and not store.has_weights(2)
    with pytest.raises(dg.DunegrassError, match="member 2 were not kept"):
        store.load_weights(2)


def test_a_flipped_byte_in_the_tensor_data_is_caught(tmp_path):
    store = _store(tmp_path)
    store.save_weights(1, _state())
    fname = tmp_path / "weights" / "member-00001.safetensors"
    data = bytearray(fname.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's data: still a well-formed safetensors file
    fname.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match=r"member-00001\.safetensors is corrupt.*checksum") as err:
        store.load_weights(1)
    assert "shard-00001.json" in str(err.value) and "retrain member 1" in str(err.value)  # the file and the fix


def test_without_a_path_weights_live_in_a_private_directory_removed_with_the_store():
    store = _store(None)
    store.save_weights(0, _state())
    directory = store.weights.directory
    assert os.path.exists(os.path.join(directory, "member-00000.safetensors"))
    assert torch.equal(store.load_weights(0)["layer.bias"], _state()["layer.bias"])
    del store
    gc.collect()
    assert not os.path.exists(directory)


def test_daunce_without_cache_dir_keeps_no_member_in_ram_and_cleans_up(tiny_classification):
    model, train, test = tiny_classification
    daunce = Daunce(model, dg.ClassificationTask(), num_models=3, steps=3, train_batch_size=8).fit(train)
    directory = daunce.store.weights.directory
    assert sorted(f for f in os.listdir(directory) if f.endswith(".safetensors")) == [
        f"member-{k:05d}.safetensors" for k in range(3)
    ]
    assert daunce.score(test).shape == (7, 40)  # new queries, from the members on disk
    del daunce
    gc.collect()
    assert not os.path.exists(directory)


def test_a_cache_with_the_old_pt_layout_gets_a_clear_error(tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "member-00000.pt").write_bytes(b"old")
    with pytest.raises(ConfigMismatchError, match=r"\.pt files.*older.*delete that cache directory"):
        _store(tmp_path)


@pytest.mark.parametrize("on_disk", [True, False])
def test_training_signals_read_in_column_chunks(tmp_path, on_disk):
    store = _store(tmp_path if on_disk else None, K=5, n=11, group=2)
    A = torch.randn(5, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert store.missing_groups() == [(0, 2), (2, 4), (4, 5)]  # aligned groups of 2
    for lo, hi in store.missing_groups():
        store.write_group(lo, A[lo:hi])
    assert store.missing_groups() == []
    for m in (1, 4, 11, 50):
        chunks = list(store.train_chunks(m))
        assert [s for s, _ in chunks] == list(range(0, 11, m))
        assert all(c.shape == (5, min(m, 11 - s)) for s, c in chunks)
        torch.testing.assert_close(torch.cat([c for _, c in chunks], 1), A, rtol=0, atol=0)
    torch.testing.assert_close(store.train_signals(), A, rtol=0, atol=0)


def test_a_corrupt_signal_shard_is_caught_when_chunks_are_read(tmp_path):
    store = _store(tmp_path, K=4, n=6, group=2)
    for lo, hi in store.missing_groups():
        store.write_group(lo, np.ones((hi - lo, 6)))
    shard = tmp_path / "train" / "signal-00001.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    reopened = _store(tmp_path, K=4, n=6, group=2)  # a new process: nothing verified yet
    with pytest.raises(CorruptCacheError, match="signal-00001.npy"):
        list(reopened.train_chunks(3))
