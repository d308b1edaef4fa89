"""Daunce on a convex model with weak data curvature: what the estimator converges to.

Softmax regression on scikit-learn's breast cancer (300 training examples, 30 standardised features, 62
parameters), L2 λ = 1e-2 against a mean data curvature of about 0.02 (nearly separable), trained to its
optimum; members minimised exactly (``trainer="newton"``), K = 2048. Each setting's scores against
(1) the full-data target (ρ²/3m)·g_zᵀH⁻¹FH⁻¹g_i, (2) the subset average (ρ²/3m)·E_k[g_zᵀH_k⁻¹F_kH_k⁻¹g_i]
over 4096 subsets of the same ratio (H_k, F_k: the subset's regularised Hessian and Fisher), (3) exact
influence g_zᵀH⁻¹g_i: Pearson and the least-squares slope. ``tests/methods/test_daunce_theory.py`` holds
the ρ = 0.1 case at test size.

    python benchmarks/daunce_convex.py [--json benchmarks/results/daunce_convex.json]
"""

from __future__ import annotations

import argparse
import copy
import os

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer

import dunegrass as dg
from dunegrass.bench.models import logistic_regression
from dunegrass.gradients import per_sample_gradients, select_parameters
from dunegrass.methods.daunce_objectives import draw_members
from dunegrass.train.newton import load_flat, newton_minimize

from common import Timer, print_table, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
L2, K, SETTINGS = 1e-2, 2048, ((1.0, 0.3), (0.1, 0.3), (1.0, 1.0))  # (ρ, ratio)


def per_example_hessians(model, x):
    """``[n, p, p]``: J_iᵀ(diag(π_i) − π_iπ_iᵀ)J_i, each example's exact softmax-loss Hessian (outputs linear in θ)."""
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    model64 = copy.deepcopy(model).double()
    one = lambda pr, xi: torch.func.functional_call(model64, pr, (xi[None],))[0]  # noqa: E731
    jac = torch.func.vmap(torch.func.jacrev(one), in_dims=(None, 0))(params, x.double())
    J = torch.cat([jac[k].reshape(len(x), jac[k].shape[1], -1) for k in params], dim=2)
    with torch.no_grad():
        prob = torch.softmax(model64(x.double()), 1)
    return J.transpose(1, 2) @ (torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]) @ J


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=os.path.join(HERE, "results", "daunce_convex.json"))
    args = ap.parse_args()
    X, y = load_breast_cancer(return_X_y=True)
    X = torch.tensor((X - X.mean(0)) / X.std(0), dtype=torch.float32)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    y = torch.tensor(y)
    train, queries = (X[perm[:300]], y[perm[:300]]), (X[perm[300:340]], y[perm[300:340]])
    task = dg.ClassificationTask()
    model = logistic_regression(30, 2, seed=0)
    terms = lambda out, batch, aux: task.loss(out, batch)  # noqa: E731
    load_flat(model, newton_minimize(model, task, train, terms, torch.arange(300)[None], l2=L2)[0])
    names = select_parameters(model)
    loss = lambda m, b: task.loss(task.outputs(m, b), b)  # noqa: E731
    g = per_sample_gradients(model, loss, train, names).double()
    gq = per_sample_gradients(model, loss, queries, names).double()
    n, p = g.shape
    hessians = per_example_hessians(model, train[0])
    eye = torch.eye(p, dtype=torch.float64)
    h_inv = torch.linalg.inv(hessians.mean(0) + L2 * eye)
    exact = gq @ h_inv @ g.T
    pearson = lambda a, b: float(np.corrcoef(a.ravel(), b.ravel())[0, 1])  # noqa: E731
    slope = lambda a, b: float((a * b).sum() / (b * b).sum())  # noqa: E731
    print(f"{p} parameters, mean data curvature {float(hessians.mean(0).trace()) / p:.3f}, L2 {L2}")
    rows = []
    for rho, ratio in SETTINGS:
        m = round(ratio * n)
        full = rho**2 / (3 * m) * gq @ h_inv @ (g.T @ g / n) @ h_inv @ g.T
        average = torch.zeros_like(full)
        for member in draw_members(n, 4096, ratio, seed=1):
            idx = member.indices
            hk_inv = torch.linalg.inv(hessians[idx].mean(0) + L2 * eye)
            average += gq @ hk_inv @ (g[idx].T @ g[idx] / m) @ hk_inv @ g.T
        average *= rho**2 / (3 * m) / 4096
        with Timer() as t:
            daunce = dg.Daunce(model, task, num_models=K, trainer="newton", l2=L2, rho=rho, subsample_ratio=ratio)
            scores = daunce.fit(train).score(queries).values.double()
        rows.append({
            "rho": rho, "ratio": ratio, "K": K,
            "pearson_full_data": pearson(scores, full), "slope_full_data": slope(scores, full),
            "pearson_subset_average": pearson(scores, average), "slope_subset_average": slope(scores, average),
            "pearson_exact_influence": pearson(scores, exact), "seconds": t.seconds,
        })  # fmt: skip
    print_table(rows, ["rho", "ratio", "pearson_full_data", "slope_full_data", "pearson_subset_average",
                       "slope_subset_average", "pearson_exact_influence", "seconds"])  # fmt: skip
    write_json(args.json, "daunce_convex", rows, l2=L2, n_train=n, n_query=len(gq), parameters=p)


if __name__ == "__main__":
    main()
