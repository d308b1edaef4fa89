import json
import os
import runpy
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import dunegrass as dg
from dunegrass.store import FeatureStore


def _store(path, config=None, n=10, shard=4):
    return FeatureStore(path, config or {"a": 1}, n, {"features": 3, "q": 1}, shard)


def _fill(store):
    for i in store.missing():
        lo, hi = store.rows(i)
        store.write(
            i,
            {
                "features": np.arange(lo * 3, hi * 3, dtype=np.float32).reshape(-1, 3),
                "q": np.ones((hi - lo, 1), np.float32),
            },
        )


@pytest.mark.parametrize("path", [None, "disk"])
def test_roundtrip_in_shards(tmp_path, path):
    store = _store(None if path is None else tmp_path / "s")
    assert store.num_shards == 3 and store.missing() == [0, 1, 2]
    _fill(store)
    assert store.complete
    np.testing.assert_array_equal(store.load(), np.arange(30, dtype=np.float32).reshape(10, 3))
    assert [start for start, _ in store.iter_shards()] == [0, 4, 8]


def test_manifest_records_shapes_config_and_hash(tmp_path):
    _store(tmp_path / "s", {"k": 7})
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["config"] == {"k": 7} and len(manifest["config_hash"]) == 64
    assert manifest["arrays"]["features"] == {"width": 3, "dtype": "float32"} and manifest["n"] == 10


def test_reopening_with_another_config_is_an_error(tmp_path):
    _store(tmp_path / "s", {"compressor": "gaussian:16"})
    with pytest.raises(dg.ConfigMismatchError, match="compressor: cached 'gaussian:16', requested 'sjlt:16'"):
        _store(tmp_path / "s", {"compressor": "sjlt:16"})


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_or_truncated_shard_is_an_error(tmp_path, damage):
    store = _store(tmp_path / "s")
    _fill(store)
    f = tmp_path / "s" / "features-00001.npy"
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        f.unlink()
    reopened = _store(tmp_path / "s")
    with pytest.raises(dg.CorruptCacheError, match="features-00001.npy.*recompute"):
        reopened.load()


def test_wrong_shard_shape_is_rejected(tmp_path):
    store = _store(tmp_path / "s")
    with pytest.raises(dg.DunegrassError, match="expected \\(4, 3\\)"):
        store.write(0, {"features": np.zeros((4, 2), np.float32), "q": np.zeros((4, 1), np.float32)})


FIT_SCRIPT = textwrap.dedent(
    """
    import sys, time, numpy as np, torch
    import dunegrass as dg

    class SlowData(torch.utils.data.Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.x, self.y = torch.randn(120, 5, generator=g), torch.randint(0, 3, (120,), generator=g)
        def __len__(self):
            return 120
        def __getitem__(self, i):
            time.sleep(0.01)
            return self.x[i], self.y[i]

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    attr = dg.GradientInfluence(model, dg.ClassificationTask(), compressor="gaussian:32", shard_size=10,
                                batch_size=5)
    attr.fit(SlowData(), cache_dir=sys.argv[1])
    np.save(sys.argv[1] + "/../done.npy", attr.stores[0].load())
    """
)


def test_killed_fit_resumes_with_identical_results(tmp_path, monkeypatch):
    script = tmp_path / "fit.py"
    script.write_text(FIT_SCRIPT)
    killed, clean = tmp_path / "killed" / "cache", tmp_path / "clean" / "cache"
    proc = subprocess.Popen([sys.executable, str(script), str(killed)])
    shard_dir = killed / "ckpt-0" / "train"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(shard_dir.glob("shard-*.json"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = sorted(p.name for p in shard_dir.glob("shard-*.json"))
    assert 3 <= len(done_before) < 12, "the run must be killed part-way"
    first_mtime = os.path.getmtime(shard_dir / "features-00000.npy")

    for cache in (killed, clean):  # resume, then an uninterrupted run (in this process: faster)
        monkeypatch.setattr(sys, "argv", [str(script), str(cache)])
        runpy.run_path(str(script), run_name="__main__")
    assert os.path.getmtime(shard_dir / "features-00000.npy") == first_mtime, "completed shards are not redone"
    resumed = np.load(tmp_path / "killed" / "done.npy", allow_pickle=False)
    uninterrupted = np.load(tmp_path / "clean" / "done.npy", allow_pickle=False)
    assert np.array_equal(resumed, uninterrupted)
    assert not list(shard_dir.glob(".tmp-*"))
