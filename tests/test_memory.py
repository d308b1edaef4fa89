"""Memory bounds of the gradient engine, checked by peak RSS in fresh subprocesses (never by timings).

Each test runs the same work at two sizes of the thing memory must not grow with, and bounds the
difference well below what the unbounded structure would take.
"""

FEATURIZE = """
import torch, dunegrass as dg
torch.manual_seed(0)
model = torch.nn.Linear(1024, 2048)  # 2.1 M parameters: one per-example gradient is 8.4 MB
x, y = torch.randn(64, 1024), torch.randint(0, 2048, (64,))
attr = dg.GradientInfluence(model, dg.ClassificationTask(), compressor="sjlt:256", damping=None,
                            batch_size={batch}, chunk_size=4)
attr.fit((x, y))
"""


def test_per_example_gradients_are_compressed_chunk_by_chunk(peak_rss_mb):
    """Bound: chunk_size × d per-example gradients. A [64, d] batch of them would be 537 MB (and a copy)."""
    small, large = peak_rss_mb(FEATURIZE.format(batch=4)), peak_rss_mb(FEATURIZE.format(batch=64))
    assert large - small < 120, f"batch 64 took {large - small:.0f} MiB more than batch 4"


FISHER = """
import torch, dunegrass as dg
import dunegrass.influence.preconditioner as pre
pre.FISHER_MEMORY = 16 << 20  # a 16 MiB budget of blocks
torch.manual_seed(0)
layers = []
for _ in range({layers}):
    layers += [torch.nn.Linear(64, 64), torch.nn.Tanh()]
model = torch.nn.Sequential(*layers, torch.nn.Linear(64, 3))
x, y = torch.randn(32, 64), torch.randint(0, 3, (32,))
attr = dg.GradientInfluence(model, dg.ClassificationTask(), compressor="sjlt:1024", per_parameter=True,
                            params=[f"{{2 * i}}.weight" for i in range({layers})])
attr.fit((x, y)).score((x[:4], y[:4]))
"""


def test_fisher_blocks_are_held_one_group_at_a_time(peak_rss_mb):
    """Bound: FISHER_MEMORY of blocks (+ one block being inverted). All 48 float64 blocks would be 384 MiB."""
    few, many = peak_rss_mb(FISHER.format(layers=4)), peak_rss_mb(FISHER.format(layers=48))
    assert many - few < 100, f"48 Fisher blocks took {many - few:.0f} MiB more than 4"


SCORES = """
import torch, dunegrass as dg
torch.manual_seed(0)
model = torch.nn.Linear(4, 3)
n = 150_000
x, y = torch.randn(n, 4), torch.randint(0, 3, (n,))
ckpts = [{{k: v + 0.01 * m for k, v in model.state_dict().items()}} for m in range({checkpoints})]
attr = dg.GradientInfluence(model, dg.ClassificationTask(), checkpoints=ckpts, batch_size=8192, chunk_size=8192)
attr.fit((x, y))
scores = attr.score((x[:{queries}], y[:{queries}]), top_k={top_k})
"""


def test_checkpoints_are_summed_in_place(peak_rss_mb):
    """Bound: one n_query × n_train matrix (240 MB here), not one per checkpoint (4 × 240 MB)."""
    one = peak_rss_mb(SCORES.format(checkpoints=1, top_k=None, queries=400))
    four = peak_rss_mb(SCORES.format(checkpoints=4, top_k=None, queries=400))
    assert four - one < 100, f"4 checkpoints took {four - one:.0f} MiB more than 1"


def test_top_k_scoring_keeps_no_dense_matrix(peak_rss_mb):
    """Bound: n_query × 4k numbers with top_k=k, instead of the 360 MB dense matrix."""
    dense = peak_rss_mb(SCORES.format(checkpoints=2, top_k=None, queries=600))
    top = peak_rss_mb(SCORES.format(checkpoints=2, top_k=10, queries=600))
    assert dense - top > 250, f"top_k saved only {dense - top:.0f} MiB"


BIF = """
import tempfile, torch, dunegrass as dg
torch.manual_seed(0)
model = torch.nn.Linear(4, 3)
n = 100_000
x, y = torch.randn(n, 4), torch.randint(0, 3, (n,))
with tempfile.TemporaryDirectory() as cache:
    dg.BayesianInfluence(model, dg.ClassificationTask(), chains=2, draws={draws}, eval_batch_size=n).fit(
        (x, y), cache_dir=cache)
"""


def test_bayesian_influence_stores_each_draw_as_it_is_drawn(peak_rss_mb):
    """Bound: one draw's signals per chain (0.8 MB each here), written to the cache at once. Holding each chain's
    40 draws until it ended would be 2 × 40 × n float64 = 64 MB, and as much again for the transfer."""
    few, many = peak_rss_mb(BIF.format(draws=2)), peak_rss_mb(BIF.format(draws=40))
    assert many - few < 30, f"40 draws per chain took {many - few:.0f} MiB more than 2"
