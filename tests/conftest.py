"""Shared fixtures: tiny, seeded models and data (fast on 2 CPU cores)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

# The device the method, store, Daunce and FactGraSS tests put their models on: CPU by default,
# ``DUNEGRASS_TEST_DEVICE=cuda pytest`` to run them on a GPU. Data stay on the host, as users hold them.
TEST_DEVICE = torch.device(os.environ.get("DUNEGRASS_TEST_DEVICE", "cpu"))


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The test device (``DUNEGRASS_TEST_DEVICE``, default cpu); fails clearly if it is not usable."""
    try:
        torch.empty(1, device=TEST_DEVICE)
    except (RuntimeError, AssertionError) as e:
        pytest.fail(f"DUNEGRASS_TEST_DEVICE={TEST_DEVICE} is not usable here: {e}")
    return TEST_DEVICE


@pytest.fixture
def tiny_classification(device):
    """A 2-layer MLP (on the test device) on 40 random examples of 6 features (on the host), 3 classes;
    returns (model, train, test)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=gen)
    y = torch.randint(0, 3, (40,), generator=gen)
    xq = torch.randn(7, 6, generator=gen)
    yq = torch.randint(0, 3, (7,), generator=gen)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(device)
    return model, (x, y), (xq, yq)


def _padded_batch(n: int = 5, t: int = 10, vocab: int = 40, seed: int = 0, side: str = "right") -> dict:
    """Token rows of random length in [3, t], padded on ``side`` with token 0 and attention_mask 0."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, t + 1, (n,), generator=gen)
    tokens = torch.randint(1, vocab, (n, t), generator=gen)
    ids, mask = torch.zeros(n, t, dtype=torch.long), torch.zeros(n, t, dtype=torch.long)
    for i, length in enumerate(lengths.tolist()):
        cols = slice(0, length) if side == "right" else slice(t - length, t)
        ids[i, cols], mask[i, cols] = tokens[i, :length], 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def padded_batch():
    """``padded_batch(n=5, t=10, vocab=40, seed=0, side="right")``: a padded causal-LM batch."""
    return _padded_batch


_SAMPLER = """
import os, resource, threading, time
peak = [0]
def _anon_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
def _watch():
    while True:
        peak[0] = max(peak[0], _anon_kb())
        time.sleep(0.001)
if os.path.exists("/proc/self/status"):
    threading.Thread(target=_watch, daemon=True).start()
"""


def _peak_rss_mb(code: str, timeout: float = 300) -> float:
    """Run ``code`` in a fresh Python process (2 threads, this repository's src on the path) and return its
    peak memory in MiB: the largest anonymous resident memory sampled every millisecond (heap and mmap'd
    allocations: unlike the whole RSS, it does not shrink when other processes push the process's library
    pages out), or ru_maxrss where /proc is missing. Memory checks compare two such runs, never a timing."""
    import subprocess
    import sys
    import textwrap

    probe = (
        _SAMPLER
        + "import torch\ntorch.set_num_threads(2)\n"
        + textwrap.dedent(code)
        + "\nrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss"
        + "\nprint('PEAK_KB', max(peak[0], _anon_kb()) if peak[0] else rss)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..", "src")}
    # Large blocks straight from mmap and back to the OS when freed: glibc's dynamic threshold otherwise
    # serves them from the heap, whose fragmentation adds ~100 MiB of noise to the peak.
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise AssertionError(f"memory probe failed:\n{done.stderr[-4000:]}")
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("PEAK_KB")][-1]
    return int(line.split()[1]) / 1024


@pytest.fixture
def peak_rss_mb():
    """``peak_rss_mb(code) -> MiB``: peak RSS of ``code`` run in a fresh subprocess."""
    return _peak_rss_mb
