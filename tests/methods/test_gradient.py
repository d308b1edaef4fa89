import numpy as np
import pytest
import torch

import dunegrass as dg
from dunegrass.data import to_device
from dunegrass.gradients import per_sample_gradients, select_parameters
from dunegrass.methods import gradient as engine


def _on(model, data):
    return to_device(data, next(model.parameters()).device)


def _grads(model, task, data, signal="loss", params=None):
    """Per-example gradients ``[n, d]`` on the host, computed on the model's device."""
    fn = task.loss if signal == "loss" else task.query_loss
    names = select_parameters(model, params)
    return per_sample_gradients(model, lambda m, b: fn(task.outputs(m, b), b), _on(model, data), names).cpu()


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
    torch.testing.assert_close(attr.self_scores().values[0].double(), self_want, rtol=2e-3, atol=1e-5)


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
    probs = torch.softmax(model(_on(model, train[0])), 1).cpu().gather(1, train[1][:, None])[:, 0]
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


def test_trak_is_q_times_the_mean_over_checkpoints_of_projected_influence(tiny_classification):
    """τ = Q ⊙ mean_m φ_{z,m}ᵀ (Φ_mᵀΦ_m/n + λ_m I)⁻¹ φ_{i,m} (algorithms.md §1.2), computed by hand from the
    log-odds gradients and each checkpoint's own Gaussian projection."""
    model, train, test = tiny_classification
    task = dg.ClassificationTask()
    logodds = dg.ClassificationTask(measurement="logodds")
    states = [{k: v.clone() for k, v in model.state_dict().items()}]
    states.append({k: v + 0.05 * torch.randn_like(v) for k, v in states[0].items()})
    trak = dg.TRAK(model, task, k=16, checkpoints=states, damping=0.1).fit(train)
    terms, qs = [], []
    for m, state in enumerate(states):
        proj = trak.featurizers[m].compressors[0]
        with dg.methods.featurize.load_weights(model, state):
            phi_train = proj(_grads(model, logodds, train, "query").to(model[0].weight.device)).cpu().double()
            phi_test = proj(_grads(model, logodds, test, "query").to(model[0].weight.device)).cpu().double()
            out = model(_on(model, train[0])).detach().cpu()
        fisher = phi_train.T @ phi_train / 40
        lam = 0.1 * torch.trace(fisher) / 16
        terms.append(phi_test @ torch.linalg.solve(fisher + lam * torch.eye(16, dtype=torch.float64), phi_train.T))
        qs.append(1 - torch.softmax(out, 1).gather(1, train[1][:, None])[:, 0])
    want = torch.stack(qs).mean(0).double() * (terms[0] + terms[1]) / 2
    got = trak.score(test).values.double()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * want.abs().max().item())
    assert trak.self_scores().shape == (1, 40)


def test_top_k_is_the_top_of_the_dense_scores(tiny_classification):
    model, train, test = tiny_classification
    attr = dg.GradientInfluence(model, dg.ClassificationTask(), compressor="gaussian:16", shard_size=7).fit(train)
    dense, top = attr.score(test), attr.score(test, top_k=3)
    assert isinstance(top, dg.TopScores) and top.n_train == 40
    np.testing.assert_array_equal(top.top().indices.numpy(), dense.top(3).indices.numpy())
    np.testing.assert_array_equal(top.bottom(2).indices.numpy(), dense.bottom(2).indices.numpy())
    torch.testing.assert_close(top.top().values, dense.top(3).values)
    with pytest.raises(dg.DunegrassError, match="top_k must be a positive integer"):
        attr.score(test, top_k=0)
    with pytest.raises(dg.DunegrassError, match="kept the top 3"):
        top.top(5)


def test_queries_scored_in_chunks_give_the_same_scores(tiny_classification, monkeypatch):
    model, train, test = tiny_classification
    attr = dg.GradientInfluence(model, dg.ClassificationTask(), compressor="gaussian:16").fit(train)
    whole = attr.score(test).values
    monkeypatch.setattr(engine, "QUERY_BYTES", 2 * 16 * 4)  # two queries per chunk
    assert attr._query_chunk() == 2
    torch.testing.assert_close(attr.score(test).values, whole, rtol=1e-5, atol=1e-6 * whole.abs().max().item())


def test_float32_fisher_is_as_good_as_float64(tiny_classification):
    model, train, test = tiny_classification
    task = dg.ClassificationTask()
    f64 = dg.GradientInfluence(model, task, damping=0.01, fisher_dtype=torch.float64).fit(train).score(test).values
    f32 = dg.GradientInfluence(model, task, damping=0.01).fit(train).score(test).values
    assert (f32 - f64).norm() / f64.norm() < 1e-4


def test_fisher_blocks_are_cached_beside_the_features(tiny_classification, tmp_path):
    model, train, test = tiny_classification
    task = dg.ClassificationTask()
    a = dg.GradientInfluence(model, task, compressor="gaussian:16").fit(train, cache_dir=tmp_path)
    blocks = list((tmp_path / "ckpt-0").glob("fisher-*/block-00000.npy"))
    assert len(blocks) == 1
    b = dg.GradientInfluence(model, task, compressor="gaussian:16", damping=0.5).fit(train, cache_dir=tmp_path)
    assert len(list((tmp_path / "ckpt-0").glob("fisher-*"))) == 2  # another damping, other blocks; features reused
    assert not torch.allclose(a.score(test).values, b.score(test).values)


def test_preflight_runs_the_loss_on_the_models_device(tiny_classification):
    """The batch moves to the model's device before the loss sees it (it once met the host batch: with the model
    on another device every gradient method failed there)."""
    model, train, _ = tiny_classification
    attr = dg.GradientInfluence(model, dg.ClassificationTask())
    model.to("meta")
    with pytest.raises(Exception) as info:  # a meta model has no values to check; it must fail later than that
        attr._preflight(train)
    assert "expected device" not in str(info.value) and "is not on the expected device" not in str(info.value)


def test_trak_measures_the_log_odds_through_the_users_task(tiny_classification):
    """TRAK replaced the task by a plain ClassificationTask (a task's own outputs were ignored); then, in
    review, a copy with its measurement renamed (a task that computes its measurement its own way was
    explained instead, and a read-only measurement_name failed). Now the task's outputs and labels, the
    log-odds as the measurement, and the cache key of a plain task as it always was."""
    from dunegrass.methods.presets import _LogOddsOf

    model, train, test = tiny_classification

    class Shifted(dg.ClassificationTask):  # its own outputs: TRAK must go through them
        def outputs(self, model, batch):
            x, _ = batch
            return model(x * 2.0)

    class OwnMeasurement(dg.ClassificationTask):  # TRAK explains the log-odds, not this
        measurement_name = property(lambda self: "margin")

        def __init__(self):
            pass

        def measurement(self, outputs, batch):
            return outputs[:, 0] - outputs[:, 1]

    def trak(task):
        return dg.TRAK(model, task, k=32).fit(train).score(test).values

    plain = trak(dg.ClassificationTask())
    torch.testing.assert_close(trak(OwnMeasurement()), plain)
    shifted = trak(Shifted())
    want = dg.TRAK(torch.nn.Sequential(_Doubling(), model), dg.ClassificationTask(), k=32).fit(train).score(test)
    torch.testing.assert_close(shifted, want.values, rtol=1e-4, atol=1e-6 * want.values.abs().max().item())
    assert not torch.allclose(shifted, plain)
    assert _LogOddsOf(dg.ClassificationTask()).config() == dg.ClassificationTask("logodds").config()


class _Doubling(torch.nn.Module):
    def forward(self, x):
        return x * 2.0
