"""BayesianInfluence (algorithms.md §3.2) against its Laplace theory on a convex model, and as a user meets it:
its standard errors, its cache, queries given late, models in train mode, LoRA on a causal LM."""

import numpy as np
import pytest
import torch

import dunegrass as dg
from dunegrass.bench.models import logistic_regression
from dunegrass.errors import DunegrassError
from dunegrass.gradients import per_sample_gradients, select_parameters
from dunegrass.influence.exact import damped_hessian
from dunegrass.train.newton import load_flat, newton_minimize


@pytest.fixture(autouse=True)
def one_thread():
    """Chains of tiny models are thousands of small steps: a second thread only adds synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _logistic(n, n_query, d, seed=0):
    """Logistic regression fitted to its optimum (no L2: the data are not separable) on draws from a logistic
    model; returns model, task, train, queries."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=gen)

    def draw(m):
        x = torch.randn(m, d, generator=gen)
        return x, (torch.rand(m, generator=gen) < torch.sigmoid(x @ w)).long()

    train, queries = draw(n), draw(n_query)
    task = dg.ClassificationTask()
    model = logistic_regression(d, 2, seed=0)
    terms = lambda out, batch, aux: task.loss(out, batch)  # noqa: E731
    load_flat(model, newton_minimize(model, task, train, terms, torch.arange(n)[None], l2=1e-6)[0])
    return model, task, train, queries


def _pearson(a, b):
    return float(np.corrcoef(np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel())[0, 1])


def test_under_the_laplace_approximation_it_is_damped_influence_with_lambda_gamma_over_nbeta():
    """The posterior exp(−nβL − (γ/2)‖w − θ₀‖²) is, to second order, N(θ₀, (nβH + γI)⁻¹), so
    Cov(ℓ_i, ℓ_z) ≈ g_zᵀ(nβH + γI)⁻¹g_i = (1/nβ)·g_zᵀ(H + λI)⁻¹g_i with λ = γ/nβ: the constant, not only
    the direction. Full-batch chains and a step small against the stiffest curvature (η·(nβh + γ) ≈ 0.15)."""
    model, task, train, queries = _logistic(600, 20, 6)
    nbeta, gamma = 600.0, 300.0
    bif = dg.BayesianInfluence(
        model, task, chains=4, draws=200, every=4, burnin=100, nbeta=nbeta, gamma=gamma, lr=2.5e-4, batch_size=600
    )
    scores = bif.fit(train).score(queries)
    names = select_parameters(model)
    loss = lambda m, b: task.loss(task.outputs(m, b), b)  # noqa: E731
    g = per_sample_gradients(model, loss, train, names).double()
    gq = per_sample_gradients(model, loss, queries, names).double()
    H = damped_hessian(model, task, train, names)
    eye = torch.eye(H.shape[0], dtype=torch.float64)
    damped_influence = gq @ torch.linalg.solve(H + gamma / nbeta * eye, g.T)  # λ = γ/nβ
    target = damped_influence / nbeta
    values = scores.values.double()
    assert _pearson(values, target) >= 0.95
    slope = float((values * target).sum() / (target * target).sum())
    assert slope == pytest.approx(1.0, rel=0.15)
    # positive = proponent: the sign of classic influence (a training example whose gradient agrees with the
    # query's lowers its loss when upweighted)
    assert _pearson(values, gq @ g.T) > 0


def test_standard_errors_are_batch_means_over_chains_and_match_the_spread_over_reruns():
    """Draws within a chain are correlated, so the i.i.d. covariance formula would understate the error;
    batch means over chains match the spread of the scores over 12 independent reruns (seeds)."""
    model, task, train, queries = _logistic(100, 6, 3, seed=1)
    runs = [
        dg.BayesianInfluence(
            model, task, chains=6, draws=40, every=2, burnin=40, nbeta=100.0, gamma=100.0, lr=1e-3, batch_size=100,
            seed=s,
        ).fit(train).score(queries)
        for s in range(12)
    ]  # fmt: skip
    values = torch.stack([r.values for r in runs]).double()
    reported = torch.stack([r.stderr for r in runs]).double().pow(2).mean().sqrt()
    empirical = values.std(0).pow(2).mean().sqrt()
    assert 0.7 < float(reported / empirical) < 1.45
    # the i.i.d. formula over the 240 draws, for comparison, is far too small
    fit = dg.BayesianInfluence(
        model, task, chains=6, draws=40, every=2, burnin=40, nbeta=100.0, gamma=100.0, lr=1e-3, batch_size=100
    ).fit(train)
    A, B = fit.signals(queries)
    iid = dg.methods.daunce_objectives.covariance_scores(A, B)[1].double().pow(2).mean().sqrt()
    assert float(iid / empirical) < 0.7


def test_chains_grow_in_a_cache_and_late_queries_replay_the_chains(tmp_path, device, monkeypatch):
    model, task, train, queries = _logistic(80, 5, 3)
    model = model.to(device)
    kw = dict(draws=15, nbeta=80.0, gamma=50.0, lr=1e-3, batch_size=16)
    two = dg.BayesianInfluence(model, task, chains=2, **kw).fit(train, queries=queries, cache_dir=tmp_path)
    three = dg.BayesianInfluence(model, task, chains=3, **kw)
    three.fit(train, queries=queries, cache_dir=tmp_path)
    A2, B2 = two.signals(queries)
    A3, B3 = three.signals(queries)
    assert A3.shape == (45, 80) and torch.equal(A3[:30], A2) and torch.equal(B3[:30], B2)
    # queries not given to fit: the chains run again and give the same signals
    late = dg.BayesianInfluence(model, task, chains=3, **kw).fit(train)
    torch.testing.assert_close(late.signals(queries)[1], B3, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(late.score(queries).values, three.score(queries).values, rtol=1e-5, atol=1e-7)
    # queries given to a later fit run the chains for the queries alone
    sides = []
    original = dg.BayesianInfluence._run
    monkeypatch.setattr(
        dg.BayesianInfluence, "_run", lambda self, c, s, st: sides.append(set(s)) or original(self, c, s, st)
    )
    extra = (queries[0] + 1.0, queries[1])
    dg.BayesianInfluence(model, task, chains=3, **kw).fit(train, queries=extra, cache_dir=tmp_path)
    assert sides == [{"query"}]
    # the model changed since fit: its chains cannot be replayed
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    with pytest.raises(DunegrassError, match="weights changed since fit"):
        late.score((queries[0] * 2, queries[1]))
    # another sampler setting is another cache
    other = dg.BayesianInfluence(model, task, chains=2, **{**kw, "gamma": 60.0})
    with pytest.raises(dg.ConfigMismatchError):
        other.fit(train, cache_dir=tmp_path)


def test_a_model_in_train_mode_with_batchnorm_and_a_frozen_layer_is_left_as_it_was(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    ).to(device)
    model[0].weight.requires_grad_(False)  # frozen: not sampled
    gen = torch.Generator().manual_seed(0)
    train = (torch.randn(40, 5, generator=gen), torch.randint(0, 3, (40,), generator=gen))
    queries = (torch.randn(4, 5, generator=gen), torch.randint(0, 3, (4,), generator=gen))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bif = dg.BayesianInfluence(model, dg.ClassificationTask(), chains=2, draws=10, batch_size=8)
    scores = bif.fit(train).score(queries)
    assert scores.values.shape == (4, 40) and torch.isfinite(scores.values).all()
    assert scores.values.abs().sum() > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and model[1].training
    assert not model[0].weight.requires_grad and model[0].bias.requires_grad


def test_lora_chains_on_a_causal_lm(padded_batch, device):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config).to(device).eval()
    data = padded_batch(n=12, t=10, vocab=40, seed=0)
    data["labels"] = data["input_ids"].masked_fill(data["attention_mask"] == 0, -100)
    queries = {k: v[:3] for k, v in data.items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = dg.LoraConfig(rank=4, target_modules=["c_fc", "c_proj"], last_layers=1)
    bif = dg.BayesianInfluence(model, dg.CausalLMTask(), chains=2, draws=8, lr=1e-3, batch_size=4, lora=lora)
    scores = bif.fit(data, queries=queries).score(queries)
    assert scores.values.shape == (3, 12) and torch.isfinite(scores.values).all() and scores.values.abs().sum() > 0
    assert not any("lora" in k for k in model.state_dict())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_settings_get_clear_errors(tiny_classification):
    model, _, _ = tiny_classification
    task = dg.ClassificationTask()
    with pytest.raises(DunegrassError, match="chains"):
        dg.BayesianInfluence(model, task, chains=0)
    with pytest.raises(DunegrassError, match="at least two draws"):
        dg.BayesianInfluence(model, task, chains=1, draws=1)
    with pytest.raises(DunegrassError, match="nbeta and lr"):
        dg.BayesianInfluence(model, task, lr=-1.0)
    with pytest.raises(DunegrassError, match="gamma"):
        dg.BayesianInfluence(model, task, gamma=-1.0)
    with pytest.raises(DunegrassError, match="finite"):
        dg.BayesianInfluence(model, task, gamma=float("nan"))
    with pytest.raises(DunegrassError, match="normalize must be True or False"):
        dg.BayesianInfluence(model, task, normalize="no")
    with pytest.raises(DunegrassError, match="unexpected keyword"):
        dg.BayesianInfluence(model, task, num_models=4)
    with pytest.raises(DunegrassError, match="call fit"):
        dg.BayesianInfluence(model, task).score(tiny_classification[2])


def test_a_diverging_chain_is_reported(tiny_classification):
    model, train, _ = tiny_classification
    bif = dg.BayesianInfluence(model, dg.ClassificationTask(), chains=2, draws=5, lr=1e20, nbeta=1e30, gamma=0.0)
    with pytest.raises(dg.NonFiniteError, match="diverged"):
        bif.fit(train)


def test_vmapped_chains_draw_what_chains_one_by_one_draw(tiny_classification):
    model, train, queries = tiny_classification
    kw = dict(chains=3, draws=12, lr=1e-3, batch_size=8, burnin=2, every=2)
    together = dg.BayesianInfluence(model, dg.ClassificationTask(), max_chains=2, **kw).fit(train, queries=queries)
    one_by_one = dg.BayesianInfluence(model, dg.ClassificationTask(), max_chains=1, **kw).fit(train, queries=queries)
    for a, b in zip(together.signals(queries), one_by_one.signals(queries)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert together.signals()[0].std(0).min() > 0  # the draws differ
