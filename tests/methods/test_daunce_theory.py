"""Daunce's estimator against its theory (algorithms.md §3) on L2-regularised logistic regression.

Each perturbed objective is minimised exactly (trainer="newton"), so what is tested is the
estimator itself: Cov ≈ (ρ²/3m) g_zᵀH⁻¹FH⁻¹g_i for ``if`` and ∝ g_zᵀ(F + λ)⁻¹g_i for ``efim``.
The data are drawn from a logistic model (so F ≈ H and both approximate exact influence) with
m = 180 examples per member, well above the 14 parameters, so each subset's Hessian is close to H.
"""

import copy

import numpy as np
import pytest
import torch

import dunegrass as dg
from dunegrass.bench.models import logistic_regression
from dunegrass.gradients import per_sample_gradients, select_parameters
from dunegrass.influence.exact import damped_hessian
from dunegrass.methods.daunce import Daunce
from dunegrass.methods.daunce_objectives import covariance_scores
from dunegrass.train.newton import load_flat, newton_minimize

L2 = 1e-2


def _pearson(a, b):
    return float(np.corrcoef(np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel())[0, 1])


def _logistic_data(n, n_query, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=gen)

    def draw(m):
        x = torch.randn(m, d, generator=gen)
        return x, (torch.rand(m, generator=gen) < torch.sigmoid(x @ w)).long()

    return draw(n), draw(n_query)


def _fit_exactly(model, task, train, l2):
    n = len(train[0])
    loss_terms = lambda out, batch, aux: task.loss(out, batch)  # noqa: E731
    load_flat(model, newton_minimize(model, task, train, loss_terms, torch.arange(n)[None], l2=l2)[0])
    return model


def _gradients(model, task, data, names):
    """Per-example loss gradients ``[n, p]`` (float64)."""
    loss = lambda m, b: task.loss(task.outputs(m, b), b)  # noqa: E731
    return per_sample_gradients(model, loss, data, names).double()


@pytest.fixture(scope="module")
def logreg():
    train, queries = _logistic_data(600, 20, 6)
    task = dg.ClassificationTask()
    model = _fit_exactly(logistic_regression(6, 2, seed=0), task, train, L2)
    names = select_parameters(model)
    g, gq = _gradients(model, task, train, names), _gradients(model, task, queries, names)
    fisher = g.T @ g / g.shape[0]
    hinv = torch.linalg.inv(damped_hessian(model, task, train, names, L2))
    return {
        "model": model,
        "task": task,
        "train": train,
        "queries": queries,
        "g": g,
        "gq": gq,
        "F": fisher,
        "Hinv": hinv,
    }


def test_the_start_is_the_regularised_optimum(logreg):
    mean_grad = logreg["g"].mean(0) + L2 * torch.cat(
        [p.detach().double().ravel() for p in logreg["model"].parameters()]
    )
    assert mean_grad.norm() < 1e-6  # float32 weights


def test_if_scores_match_the_influence_theory(logreg):
    lr = logreg
    daunce = Daunce(lr["model"], lr["task"], num_models=600, variant="if", trainer="newton", l2=L2, max_members=300)
    scores = daunce.fit(lr["train"]).score(lr["queries"])
    target = lr["gq"] @ lr["Hinv"] @ lr["F"] @ lr["Hinv"] @ lr["g"].T
    assert _pearson(scores.values, target) >= 0.95
    exact = (
        dg.ExactInfluence(lr["model"], lr["task"], l2=L2, hessian="exact", damping=0.0)
        .fit(lr["train"])
        .score(lr["queries"])
    )
    assert _pearson(scores.values, exact.values) >= 0.9
    # The scale, not just the direction: Cov ≈ (ρ²/3m)·g_zᵀH⁻¹FH⁻¹g_i with m = 180.
    slope = float((scores.values.double() * target).sum() / (target * target).sum())
    assert slope == pytest.approx(1 / (3 * 180), rel=0.15)


def test_efim_scores_match_the_fisher_theory(logreg):
    """efim's restoring force is 2γF_k plus the L2 prox, so its target is g_zᵀ(F + l2/2γ)⁻¹g_i."""
    lr = logreg
    daunce = Daunce(lr["model"], lr["task"], num_models=600, variant="efim", trainer="newton", l2=L2, max_members=300)
    scores = daunce.fit(lr["train"]).score(lr["queries"])
    eye = torch.eye(lr["F"].shape[0], dtype=torch.float64)
    target = lr["gq"] @ torch.linalg.solve(lr["F"] + L2 / 2 * eye, lr["g"].T)
    assert _pearson(scores.values, target) >= 0.95


def test_standard_errors_match_the_spread_over_reruns():
    """25 independent reruns (seeds) of K = 40: the reported stderr matches the empirical spread of
    the scores, pair by pair; pooling 4 reruns (K = 160) halves it (1/√K)."""
    train, queries = _logistic_data(200, 8, 4, seed=1)
    task = dg.ClassificationTask()
    model = _fit_exactly(logistic_regression(4, 2, seed=0), task, train, L2)
    fits = [Daunce(model, task, num_models=40, trainer="newton", l2=L2, seed=s).fit(train) for s in range(25)]
    runs = [f.score(queries) for f in fits]
    values = torch.stack([r.values for r in runs]).double()
    reported = torch.stack([r.stderr for r in runs]).double().pow(2).mean(0).sqrt()  # RMS over reruns
    empirical = values.std(0)
    assert 0.85 < float(reported.pow(2).mean().sqrt() / empirical.pow(2).mean().sqrt()) < 1.15
    assert _pearson(reported, empirical) > 0.8
    signals = [f.signals(queries) for f in fits[:4]]
    pooled = covariance_scores(torch.cat([a for a, _ in signals]), torch.cat([b for _, b in signals]))[1]
    single = torch.stack([r.stderr for r in runs[:4]]).double().pow(2).mean().sqrt()
    assert float(pooled.double().pow(2).mean().sqrt() / single) == pytest.approx(0.5, rel=0.1)


def _per_example_hessians(model, x):
    """``[n, p, p]``: J_iᵀ(diag(π_i) − π_iπ_iᵀ)J_i, the exact Hessian of each example's softmax loss (a model
    whose outputs are linear in its parameters), in ``model.named_parameters()`` order."""
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    model64 = copy.deepcopy(model).double()
    one = lambda pr, xi: torch.func.functional_call(model64, pr, (xi[None],))[0]  # noqa: E731
    jac = torch.func.vmap(torch.func.jacrev(one), in_dims=(None, 0))(params, x.double())
    J = torch.cat([jac[k].reshape(len(x), jac[k].shape[1], -1) for k in params], dim=2)  # [n, o, p]
    with torch.no_grad():
        prob = torch.softmax(model64(x.double()), 1)
    curvature = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
    return J.transpose(1, 2) @ curvature @ J


@pytest.fixture
def one_thread():
    """Thousands of 62 × 62 solves: a second thread only adds synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_with_weak_data_curvature_the_estimator_converges_to_the_subset_average(one_thread):
    """Nearly separable data (breast cancer, 30 standardised features) and strong L2 (1e-2 against a mean data
    curvature of 0.02): each member's subset Hessian H_k = H_data,k + l2·I varies from subset to subset, and
    to first order in ρ the covariance converges to (ρ²/3m)·E_k[g_zᵀH_k⁻¹F_kH_k⁻¹g_i] — which exceeds the
    full-data formula (H⁻¹FH⁻¹) by Jensen's inequality (the inverse is convex), here by about 40 %. At ρ = 1
    the members move far enough for the loss's higher orders to matter (Pearson ≈ 0.86 with the same target,
    K = 2048); at ρ = 0.1 the first-order theory holds. (benchmarks/daunce_convex.py; README "Daunce on a
    convex model".)
    """
    from sklearn.datasets import load_breast_cancer

    from dunegrass.methods.daunce_objectives import draw_members

    X, y = load_breast_cancer(return_X_y=True)
    X = torch.tensor((X - X.mean(0)) / X.std(0), dtype=torch.float32)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    train, queries = (X[perm[:300]], torch.tensor(y)[perm[:300]]), (X[perm[300:330]], torch.tensor(y)[perm[300:330]])
    task = dg.ClassificationTask()
    model = _fit_exactly(logistic_regression(30, 2, seed=0), task, train, L2)
    names = select_parameters(model)
    g, gq = _gradients(model, task, train, names), _gradients(model, task, queries, names)
    n, p = g.shape
    rho, ratio, K = 0.1, 0.3, 768
    m = round(ratio * n)
    hessians = _per_example_hessians(model, train[0])
    eye = torch.eye(p, dtype=torch.float64)
    subset_average = torch.zeros(len(gq), n, dtype=torch.float64)
    for member in draw_members(n, 2048, ratio, seed=1):  # another seed than Daunce's: the expectation, not its draws
        idx = member.indices
        hk_inv = torch.linalg.inv(hessians[idx].mean(0) + L2 * eye)
        subset_average += gq @ hk_inv @ (g[idx].T @ g[idx] / m) @ hk_inv @ g.T
    subset_average *= rho**2 / (3 * m) / 2048
    h_inv = torch.linalg.inv(hessians.mean(0) + L2 * eye)
    full_data = rho**2 / (3 * m) * gq @ h_inv @ (g.T @ g / n) @ h_inv @ g.T

    daunce = Daunce(model, task, num_models=K, trainer="newton", l2=L2, rho=rho, subsample_ratio=ratio)
    values = daunce.fit(train).score(queries).values.double()
    slope = lambda a, b: float((a * b).sum() / (b * b).sum())  # noqa: E731
    assert _pearson(values, subset_average) >= 0.98
    assert slope(values, subset_average) == pytest.approx(1.0, rel=0.08)
    assert slope(subset_average, full_data) > 1.2  # the Jensen gap the full-data formula leaves out
