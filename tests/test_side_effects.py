"""Library calls leave process-wide settings alone: the thread count, the matplotlib backend."""

import torch

import dunegrass as dg


def test_streaming_a_gaussian_projection_never_sets_the_thread_count(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    proj = dg.Gaussian(20_000, 4096, seed=0, max_cache_bytes=0, workers=2)  # not cached: streamed in groups
    assert proj.group_rows < proj.in_dim  # several groups, drawn by two threads
    x = torch.randn(4, 20_000)
    y = proj(x)
    assert calls == []
    torch.testing.assert_close(y, x @ proj.matrix(), rtol=1e-4, atol=1e-4)


def test_the_report_keeps_the_users_matplotlib_backend():
    import matplotlib
    import numpy as np

    from dunegrass.report.figures import image_png, lds_versus_seconds

    before = matplotlib.get_backend()
    matplotlib.use("pdf")
    try:
        assert image_png(np.zeros((8, 8)))
        assert lds_versus_seconds({"A": {"lds": 0.3, "lds_ci": [0.2, 0.4], "seconds": 1.0}})
        assert matplotlib.get_backend() == "pdf"
    finally:
        matplotlib.use(before)
