"""K-FAC and EK-FAC against exact influence where they are exact, against the Fisher they approximate where
they are not, against brute-force factors on a Conv2d, and across batch sizes, caches and two ranks."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import dunegrass as dg
from dunegrass.errors import DunegrassError


class SquaredTask(dg.Task):
    """½‖W x − y‖² on ``(x, y)`` batches: at W = 0 the output gradient is δ = −y exactly."""

    def outputs(self, model, batch):
        return model(batch[0])

    def loss(self, outputs, batch):
        return 0.5 * ((outputs - batch[1]) ** 2).sum(-1)


def _design(pair_counts: torch.Tensor, query_seed: int = 0):
    """Examples x = e_j, y = −e_k, pair (j, k) repeated ``pair_counts[k, j]`` times; dense random queries."""
    d_out, d_in = pair_counts.shape
    xs, ys = [], []
    for k in range(d_out):
        for j in range(d_in):
            for _ in range(int(pair_counts[k, j])):
                xs.append(F.one_hot(torch.tensor(j), d_in).float())
                ys.append(-F.one_hot(torch.tensor(k), d_out).float())
    gen = torch.Generator().manual_seed(query_seed)
    queries = (torch.randn(5, d_in, generator=gen), torch.randn(5, d_out, generator=gen))
    return (torch.stack(xs), torch.stack(ys)), queries


def _zero_linear(d_in, d_out):
    layer = nn.Linear(d_in, d_out, bias=False)
    nn.init.zeros_(layer.weight)
    return nn.Sequential(layer)  # capture selects a model's submodules


def _per_example_grads(model, task, data):
    """Flat per-example gradients by plain autograd, one example at a time (independent of the capture)."""
    rows = []
    for i in range(len(data[0])):
        batch = (data[0][i : i + 1], data[1][i : i + 1])
        model.zero_grad()
        task.loss(task.outputs(model, batch), batch).sum().backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]).double())
    model.zero_grad()
    return torch.stack(rows)


def _exact_fisher_influence(model, task, train, queries, damping):
    g_train = _per_example_grads(model, task, train)
    g_query = _per_example_grads(model, task, queries)
    fisher = g_train.T @ g_train / len(g_train)
    lam = damping * torch.trace(fisher) / fisher.shape[0]
    return g_query @ torch.linalg.solve(fisher + lam * torch.eye(fisher.shape[0], dtype=fisher.dtype), g_train.T)


@pytest.mark.parametrize("method", [dg.KFAC, dg.EKFAC])
def test_kfac_is_exact_influence_when_the_fisher_is_a_kronecker_product(method):
    # A full factorial design: x and δ independent, so E[vec G vec Gᵀ] = S ⊗ A exactly.
    counts = torch.outer(torch.tensor([1, 2, 4]), torch.tensor([1, 3, 2, 5]))  # [d_out, d_in]
    train, queries = _design(counts)
    model, task = _zero_linear(4, 3), SquaredTask()
    got = method(model, task, fisher="empirical", damping=0.05, batch_size=7).fit(train).score(queries)
    want = _exact_fisher_influence(model, task, train, queries, 0.05)
    torch.testing.assert_close(got.values.double(), want, rtol=1e-4, atol=1e-5)


def test_ekfac_is_exact_and_kfac_is_not_when_the_eigenbasis_is_exact_but_the_fisher_is_not_kronecker():
    # Pairs (j, k) with frequencies that are not a product: F is diagonal in the standard basis (the
    # eigenbasis of A and S, whose marginals are distinct) but not S ⊗ A.
    counts = torch.tensor([[6, 1, 1, 2], [1, 5, 2, 1], [1, 1, 1, 9]])
    train, queries = _design(counts)
    model, task = _zero_linear(4, 3), SquaredTask()
    want = _exact_fisher_influence(model, task, train, queries, 0.05)
    ekfac = dg.EKFAC(model, task, fisher="empirical", damping=0.05).fit(train).score(queries)
    kfac = dg.KFAC(model, task, fisher="empirical", damping=0.05).fit(train).score(queries)
    torch.testing.assert_close(ekfac.values.double(), want, rtol=1e-4, atol=1e-5)
    assert (kfac.values.double() - want).abs().max() > 0.05 * want.abs().max()


def _block_matrix(block):
    q = torch.kron(block.QS, block.QA)  # G [d_out, in_dim] flattened row-major: index o · in_dim + i
    return q @ torch.diag(block.eigenvalues.flatten()) @ q.T


def test_ekfac_is_the_best_diagonal_in_the_kfac_eigenbasis_on_a_real_mlp():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 5, generator=gen), torch.randint(0, 3, (60,), generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    task = dg.ClassificationTask()
    kfac = dg.KFAC(model, task, fisher="empirical").fit((x, y))
    ekfac = dg.EKFAC(model, task, fisher="empirical").fit((x, y))
    grads = _per_example_grads(model, task, (x, y))
    offset = 0
    for layer, kb, eb in zip(kfac.layers, kfac.blocks, ekfac.blocks):
        # the layer's gradient as [d_out, in_dim] with the bias as the last column, flattened row-major
        w = layer.module.weight.numel()
        g_w = grads[:, offset : offset + w].reshape(len(grads), layer.out_dim, -1)
        g_b = grads[:, offset + w : offset + w + layer.out_dim, None]
        offset += w + layer.out_dim
        g = torch.cat([g_w, g_b], dim=2).flatten(1)
        fisher = g.T @ g / len(g)
        q = torch.kron(eb.QS, eb.QA)
        torch.testing.assert_close(eb.eigenvalues.flatten(), torch.diag(q.T @ fisher @ q), rtol=1e-4, atol=1e-8)
        err_ekfac = torch.linalg.norm(_block_matrix(eb) - fisher)
        err_kfac = torch.linalg.norm(_block_matrix(kb) - fisher)
        assert err_ekfac <= err_kfac + 1e-9


def test_conv2d_factors_equal_a_brute_force_computation():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, 5, 5, generator=gen)
    torch.manual_seed(1)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2))

    class ConvTask(dg.Task):
        def outputs(self, model, batch):
            return model(batch[0])

        def loss(self, outputs, batch):
            return (outputs**2).flatten(1).sum(1)

    attr = dg.KFAC(conv, ConvTask(), fisher="empirical", batch_size=4).fit((x, torch.zeros(6)))
    block = attr.blocks[0]
    patches = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2)  # [N, T, C·kh·kw]
    patches = torch.cat([patches, torch.ones(*patches.shape[:2], 1)], 2).reshape(-1, 19).double()
    out = conv(x)
    delta = (2 * out).detach().flatten(2).transpose(1, 2).reshape(-1, 3).double()  # ∂ℓ/∂y
    torch.testing.assert_close(block.A / block.positions, patches.T @ patches / len(patches))
    torch.testing.assert_close(block.S / block.examples, delta.T @ delta / 6)


def _mlp_data(n=40):
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(n, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    return model, (x, y), (x[:6] + 0.1, y[:6])


@pytest.mark.parametrize("method", [dg.KFAC, dg.EKFAC])
def test_true_fisher_scores_do_not_depend_on_the_batch_size(method):
    model, train, queries = _mlp_data()
    task = dg.ClassificationTask()
    a = method(model, task, batch_size=4).fit(train).score(queries)
    b = method(model, task, batch_size=13).fit(train).score(queries)
    torch.testing.assert_close(a.values, b.values, rtol=1e-4, atol=1e-6)
    other_seed = method(model, task, batch_size=4, seed=1).fit(train).score(queries)
    assert not torch.allclose(a.values, other_seed.values)  # the draws are real: another seed, other factors


def test_factors_are_cached_checked_and_refitted_when_the_data_change(tmp_path, monkeypatch):
    model, train, queries = _mlp_data()
    task = dg.ClassificationTask()
    first = dg.EKFAC(model, task).fit(train, cache_dir=tmp_path).score(queries)
    monkeypatch.setattr(dg.EKFAC, "_pass", lambda *a: (_ for _ in ()).throw(AssertionError("refitted")))
    again = dg.EKFAC(model, task).fit(train, cache_dir=tmp_path).score(queries)
    torch.testing.assert_close(first.values, again.values)
    changed = (train[0].clone(), train[1])
    changed[0][3] += 1.0
    with pytest.raises(AssertionError, match="refitted"):  # other data: another key, fitted again
        dg.EKFAC(model, task).fit(changed, cache_dir=tmp_path)
    (factors,) = tmp_path.rglob("factors.safetensors")
    factors.write_bytes(factors.read_bytes()[:-8])
    with pytest.raises(DunegrassError, match="checksum"):
        dg.EKFAC(model, task).fit(train, cache_dir=tmp_path)


def test_self_scores_and_full_rank_queries_match_the_scores():
    model, train, queries = _mlp_data()
    task = dg.ClassificationTask()
    attr = dg.EKFAC(model, task, fisher="empirical").fit(train)
    own = attr.self_scores().values[0]
    diagonal = torch.stack([attr.score((train[0][i : i + 1], train[1][i : i + 1])).values[0, i] for i in range(5)])
    # the query side differentiates the measurement; for ClassificationTask("loss") that is the loss
    torch.testing.assert_close(own[:5], diagonal, rtol=1e-4, atol=1e-6)
    full = dg.EKFAC(model, task, fisher="empirical", query_rank=8).fit(train).score(queries)
    torch.testing.assert_close(full.values, attr.score(queries).values, rtol=1e-3, atol=1e-5)
    low = dg.EKFAC(model, task, fisher="empirical", query_rank=1).fit(train).score(queries)
    assert not torch.allclose(low.values, attr.score(queries).values)


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_causal_lm_with_padding_gets_the_scores_of_its_unpadded_examples(side):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=40, n_positions=16)
    torch.manual_seed(3)
    model = transformers.GPT2LMHeadModel(config).eval()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 40, (6, 8), generator=gen)
    mask = torch.ones_like(ids)
    mask[:, 6:] = 0  # two padding positions per example (the true Fisher draws only for real tokens)
    padded = {"input_ids": ids, "attention_mask": mask}
    if side == "left":
        padded = {"input_ids": ids.roll(2, 1), "attention_mask": mask.roll(2, 1)}
    trimmed = {"input_ids": ids[:, :6], "attention_mask": mask[:, :6]}
    queries = {"input_ids": ids[:2, :6]}
    task = dg.CausalLMTask()
    a = dg.KFAC(model, task).fit(padded).score(queries)
    b = dg.KFAC(model, task).fit(trimmed).score(queries)
    torch.testing.assert_close(a.values, b.values, rtol=1e-3, atol=1e-5)
    assert torch.isfinite(a.values).all() and a.values.abs().max() > 0


def test_a_task_without_sampling_asks_for_the_empirical_fisher():
    counts = torch.ones(2, 3, dtype=torch.long)
    train, _ = _design(counts)
    with pytest.raises(DunegrassError, match="fisher='empirical'"):
        dg.KFAC(_zero_linear(3, 2), SquaredTask()).fit(train)


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, train, queries = _mlp_data()
        attr = dg.EKFAC(model, dg.ClassificationTask(), batch_size=5).fit(train, cache_dir=os.path.join(out, "cache"))
        np.save(os.path.join(out, f"scores-{rank}.npy"), attr.score(queries).values.numpy())
        dist.barrier()  # no rank tears gloo down while its peer still talks to it
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_the_single_process_scores(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(2, port, str(tmp_path)), nprocs=2, start_method="spawn")
    model, train, queries = _mlp_data()
    want = dg.EKFAC(model, dg.ClassificationTask(), batch_size=5).fit(train).score(queries).values.numpy()
    for rank in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"scores-{rank}.npy"), want, rtol=1e-4, atol=1e-6)
    # rank 0 wrote the reduced factors: a single process loads them and scores the same
    cached = dg.EKFAC(model, dg.ClassificationTask(), batch_size=5)
    cached._pass = lambda *a: (_ for _ in ()).throw(AssertionError("refitted"))
    scores = cached.fit(train, cache_dir=tmp_path / "cache").score(queries).values.numpy()
    np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-6)


def test_a_fit_killed_in_the_second_pass_resumes_there(tmp_path, monkeypatch):
    model, train, queries = _mlp_data()
    task = dg.ClassificationTask()
    want = dg.EKFAC(model, task).fit(train).score(queries)
    original, passes = dg.EKFAC._pass, []

    def killed(self, data, what):
        passes.append(what)
        if what == "correction":
            raise KeyboardInterrupt("killed")
        return original(self, data, what)

    monkeypatch.setattr(dg.EKFAC, "_pass", killed)
    with pytest.raises(KeyboardInterrupt):
        dg.EKFAC(model, task).fit(train, cache_dir=tmp_path)
    monkeypatch.setattr(dg.EKFAC, "_pass", lambda self, data, what: passes.append(what) or original(self, data, what))
    got = dg.EKFAC(model, task).fit(train, cache_dir=tmp_path).score(queries)
    assert passes == ["covariances", "correction", "correction"]  # the covariances were not computed again
    torch.testing.assert_close(got.values, want.values)


def test_the_true_fisher_output_factor_is_the_softmax_covariance():
    # softmax regression, T = 1: with targets drawn from the model, S estimates E[diag(p) − p pᵀ]
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(4, 3, generator=gen)
    x = base.repeat(1500, 1)
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 5))
    attr = dg.KFAC(model, dg.ClassificationTask(), batch_size=500).fit((x, torch.zeros(len(x), dtype=torch.long)))
    with torch.no_grad():
        p = torch.softmax(model(base), 1).double()
    want = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    block = attr.blocks[0]
    torch.testing.assert_close(block.S / block.examples, want, atol=0.01, rtol=0)
    assert (block.S / block.examples - want).abs().max() > 0  # estimated from draws, not computed exactly


def test_the_cache_is_keyed_by_what_the_factors_depend_on(tmp_path, monkeypatch):
    model, train, queries = _mlp_data()
    task = dg.ClassificationTask()
    dg.KFAC(model, task).fit(train, cache_dir=tmp_path)
    fitted = []
    original = dg.KFAC._pass
    monkeypatch.setattr(dg.KFAC, "_pass", lambda self, d, w: fitted.append(w) or original(self, d, w))
    dg.KFAC(model, task, damping=0.5, query_rank=2, batch_size=9).fit(train, cache_dir=tmp_path)
    assert fitted == []  # scoring settings reuse the factors
    dg.KFAC(model, task, fisher="empirical").fit(train, cache_dir=tmp_path)
    dg.KFAC(model, task, seed=1).fit(train, cache_dir=tmp_path)
    dg.KFAC(model, task, modules=["2"]).fit(train, cache_dir=tmp_path)
    with torch.no_grad():
        model[0].weight[0, 0] += 0.1
    dg.KFAC(model, task).fit(train, cache_dir=tmp_path)
    assert fitted == ["covariances"] * 4


def test_a_layer_the_loss_never_reaches_changes_nothing():
    class Side(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(5)
            self.body, self.side = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)), nn.Linear(5, 2)

        def forward(self, x):
            self.side(x)  # runs, but no loss depends on it
            return self.body(x)

    model, train, queries = _mlp_data()
    side = Side()
    side.body.load_state_dict(model.state_dict())
    task = dg.ClassificationTask()
    with_side = dg.EKFAC(side, task, fisher="empirical").fit(train)
    without = dg.EKFAC(side, task, fisher="empirical", modules=["body.0", "body.2"]).fit(train)
    torch.testing.assert_close(with_side.score(queries).values, without.score(queries).values)
    torch.testing.assert_close(with_side.self_scores().values, without.self_scores().values)


def test_bad_labels_settings_and_a_layer_run_more_often_than_in_fit_are_clear_errors():
    model, (x, y), queries = _mlp_data()
    task = dg.ClassificationTask()
    with pytest.raises(DunegrassError, match=r"labels must lie in \[0, 3\)"):
        dg.EKFAC(model, task).fit((x, y + 5))
    for bad in ({"damping": float("inf")}, {"damping": 0}, {"seed": 1.5}, {"fisher": "foo"}, {"query_rank": 0}):
        with pytest.raises(DunegrassError):
            dg.KFAC(model, task, **bad)

    class Unrolled(nn.Module):  # a cell applied k times: its gradient is the sum over the calls
        def __init__(self):
            super().__init__()
            torch.manual_seed(6)
            self.cell, self.head, self.k = nn.Linear(5, 5), nn.Linear(5, 3), 1

        def forward(self, inputs):
            for _ in range(self.k):
                inputs = torch.tanh(self.cell(inputs))
            return self.head(inputs)

    unrolled = Unrolled()
    attr = dg.KFAC(unrolled, task, fisher="empirical").fit((x, y))
    unrolled.k = 3
    with pytest.raises(DunegrassError, match="ran more than once in this batch"):
        attr.score(queries)


def test_a_selected_layer_the_loss_never_reaches_scores_zero():
    class WithAux(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(7)
            self.net, self.aux = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)), nn.Linear(5, 2)

        def forward(self, inputs):
            return {"logits": self.net(inputs), "aux": self.aux(inputs)}

    _, train, queries = _mlp_data()
    attr = dg.EKFAC(WithAux(), dg.ClassificationTask(), modules=["aux"]).fit(train)
    assert (attr.score(queries).values == 0).all() and (attr.self_scores().values == 0).all()
