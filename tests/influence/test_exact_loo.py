import pytest
import torch

import dunegrass as dg
from dunegrass.bench.data import breast_cancer
from dunegrass.bench.models import logistic_regression
from dunegrass.train.newton import load_flat, newton_fit


def test_exact_influence_matches_leave_one_out_retraining():
    """On L2-regularised logistic regression, g_zᵀH⁻¹g_i / n predicts the real LOO effect."""
    (x, y), (xq, yq) = breast_cancer(n_train=150, n_test=20)
    l2 = 0.1
    task = dg.ClassificationTask()
    model = logistic_regression(30, 2)
    load_flat(model, newton_fit(model, task, (x, y), torch.ones(1, 150), l2)[0])

    effects = dg.leave_one_out(model, task, (x, y), (xq, yq), l2)  # [20, 150]
    scores = dg.ExactInfluence(model, task, l2=l2, hessian="exact", damping=0.0).fit((x, y)).score((xq, yq))
    corr = dg.loo_correlation(scores.values / 150, effects)
    assert corr["pearson"] >= 0.95, corr
    assert corr["per_query_spearman"] >= 0.95, corr
    # the same numbers, not only the same ranking: the first-order prediction has the LOO scale
    ratio = (scores.values.double() / 150).norm() / effects.norm()
    assert 0.8 < ratio < 1.25


def test_hessian_modes_agree_on_a_linear_model():
    """For a linear model with cross-entropy the Gauss-Newton matrix is the Hessian."""
    (x, y), _ = breast_cancer(n_train=60, n_test=5)
    model = logistic_regression(30, 2)
    task = dg.ClassificationTask()
    names = [n for n, _ in model.named_parameters()]
    exact = dg.influence.damped_hessian(model, task, (x, y), names, mode="exact")
    gn = dg.influence.damped_hessian(model, task, (x, y), names, mode="gauss_newton")
    torch.testing.assert_close(exact, gn, rtol=1e-4, atol=1e-6)


def test_defaults_are_the_setting_that_works_on_a_network(tiny_classification):
    """Gauss-Newton with damping 0.1 by default; the exact Hessian of a non-convex MLP, undamped, is indefinite,
    which is an error naming the fixes rather than a warning and an eigenvalue hack."""
    model, train, test = tiny_classification
    task = dg.ClassificationTask()
    default = dg.ExactInfluence(model, task)
    assert default.hessian_mode == "gauss_newton" and default.hessian_damping == 0.1
    assert torch.isfinite(default.fit(train).score(test).values).all()
    with pytest.raises(dg.DunegrassError, match="not positive definite.*hessian='gauss_newton'.*damping"):
        dg.ExactInfluence(model, task, hessian="exact", damping=0.0).fit(train).score(test)


def test_leave_one_out_names_a_singular_or_non_convex_objective():
    """A softmax without L2 failed with torch's LinAlgError; a network returned unconverged refits silently."""
    (x, y), (xq, yq) = breast_cancer(n_train=60, n_test=3)
    task = dg.ClassificationTask()
    with pytest.raises(dg.DunegrassError, match=r"Hessian is singular.*l2 > 0"):
        dg.leave_one_out(logistic_regression(30, 2), task, (x, y), (xq, yq), 0.0)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(30, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    with pytest.raises(dg.DunegrassError, match="did not converge.*convex models"):
        dg.leave_one_out(net, task, (x, y), (xq, yq), 1e-3)
