import numpy as np
import pytest
import torch

import dunegrass as dg
from dunegrass.gradients import per_sample_gradients, select_parameters


def _grads(model, task, data, signal="loss"):
    fn = task.loss if signal == "loss" else task.query_loss
    return per_sample_gradients(model, lambda m, b: fn(task.outputs(m, b), b), data, select_parameters(model))


def test_tracin_is_the_gradient_dot_product(tiny_classification):
    model, train, test = tiny_classification
    task = dg.ClassificationTask()
    scores = dg.TracIn(model, task).fit(train).score(test)
    want = _grads(model, task, test, "query") @ _grads(model, task, train).T
    torch.testing.assert_close(scores.values, want, rtol=1e-4, atol=1e-6)
    assert scores.shape == (7, 40)


def test_identity_influence_matches_the_formula(tiny_classification):
    """Σ φ_zᵀ (F + λI)⁻¹ φ_i with F = ΦᵀΦ/n and λ = d·tr(F)/p, computed by hand."""
    model, train, test = tiny_classification
    task = dg.ClassificationTask()
    attr = dg.GradientInfluence(model, task, compressor="identity", damping=0.05).fit(train)
    g_train, g_test = _grads(model, task, train).double(), _grads(model, task, test, "query").double()
    fisher = g_train.T @ g_train / 40
    lam = 0.05 * torch.trace(fisher) / fisher.shape[0]
    want = g_test @ torch.linalg.solve(fisher + lam * torch.eye(fisher.shape[0]), g_train.T)
    torch.testing.assert_close(attr.score(test).values.double(), want, rtol=2e-3, atol=1e-5)
    self_want = (g_train @ torch.linalg.solve(fisher + lam * torch.eye(fisher.shape[0]), g_train.T)).diag()
    torch.testing.assert_close(attr.self_scores().double(), self_want, rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize("spec", ["gaussian:32", "rademacher:32", "identity"])
def test_scores_do_not_depend_on_batch_or_shard_size(tiny_classification, spec):
    model, train, test = tiny_classification
    task = dg.ClassificationTask()
    a = dg.GradientInfluence(model, task, compressor=spec, batch_size=40, shard_size=40).fit(train).score(test)
    b = dg.GradientInfluence(model, task, compressor=spec, batch_size=3, chunk_size=2, shard_size=7).fit(train)
    torch.testing.assert_close(a.values, b.score(test).values, rtol=1e-4, atol=1e-5 * a.values.abs().max().item())


def test_gaussian_influence_approximates_the_uncompressed_one(tiny_classification):
    model, train, test = tiny_classification
    task = dg.ClassificationTask()
    exact = dg.GradientInfluence(model, task, compressor="identity", damping=None).fit(train).score(test)
    approx = dg.GradientInfluence(model, task, compressor="gaussian:80", damping=None).fit(train).score(test)
    r = np.corrcoef(exact.values.ravel(), approx.values.ravel())[0, 1]
    assert r > 0.9


def test_sign_convention_proponents_are_positive(tiny_classification):
    """A query identical to a training example is most helped by that example."""
    model, (x, y), _ = tiny_classification
    task = dg.ClassificationTask()
    scores = dg.GradientInfluence(model, task, damping=0.1).fit((x, y)).score((x[:5], y[:5]))
    assert (scores.top(1)[0][:, 0] == torch.arange(5)).all()
    assert (scores.values.diagonal()[:5] > 0).all()


def test_trak_weights_by_one_minus_p_and_averages_checkpoints(tiny_classification):
    model, train, test = tiny_classification
    task = dg.ClassificationTask()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    shifted = {k: v + 0.1 for k, v in state.items()}
    one = dg.TRAK(model, task, k=16, checkpoints=[state]).fit(train)
    probs = torch.softmax(model(train[0]), 1).gather(1, train[1][:, None])[:, 0]
    torch.testing.assert_close(one.q_weights(), (1 - probs).detach())
    two = dg.TRAK(model, task, k=16, checkpoints=[state, shifted]).fit(train)
    assert two.score(test).shape == (7, 40)
    assert torch.equal(model.state_dict()["0.weight"], state["0.weight"]), "checkpoints must not leak into the model"
    with pytest.raises(dg.DunegrassError, match="TRAK needs a ClassificationTask"):
        dg.TRAK(model, dg.CausalLMTask())


def test_cache_is_reused_and_guarded(tiny_classification, tmp_path):
    model, train, test = tiny_classification
    task = dg.ClassificationTask()
    a = dg.GradientInfluence(model, task, compressor="gaussian:16").fit(train, cache_dir=tmp_path)
    b = dg.GradientInfluence(model, task, compressor="gaussian:16").fit(train, cache_dir=tmp_path)
    torch.testing.assert_close(a.score(test).values, b.score(test).values)
    with pytest.raises(dg.ConfigMismatchError, match="different configuration"):
        dg.GradientInfluence(model, task, compressor="gaussian:24").fit(train, cache_dir=tmp_path)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(dg.ConfigMismatchError, match="weights"):
        dg.GradientInfluence(model, task, compressor="gaussian:16").fit(train, cache_dir=tmp_path)


def test_scores_save_load_top(tmp_path):
    values = torch.tensor([[0.5, -1.0, 2.0], [0.0, 3.0, -2.0]])
    s = dg.Scores(values, stderr=torch.full((2, 3), 0.5), method="x", meta={"k": 1})
    idx, vals = s.top(2)
    assert idx.tolist() == [[2, 0], [1, 0]] and vals[0, 0] == 2.0
    assert s.bottom(1)[0].tolist() == [[1], [2]]
    s.save(tmp_path / "s.npz")
    back = dg.Scores.load(tmp_path / "s.npz")
    assert torch.equal(back.values, values) and torch.equal(back.stderr, s.stderr)
    assert back.method == "x" and back.meta == {"k": 1}
    with np.load(tmp_path / "s.npz", allow_pickle=False) as z:
        assert set(z.files) == {"values", "stderr", "meta_json"}
