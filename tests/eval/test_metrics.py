import numpy as np
import pytest
import torch
from scipy import stats

import dunegrass as dg
from dunegrass.eval import GroundTruth, mean_ci, random_subsets


def _linear_truth(tau, masks):
    """Retrained query losses that are exactly linear in the subset: loss_j = -Σ_{i∈S_j} τ_i."""
    return GroundTruth(masks, -(masks.double() @ tau.double().T).float())


def test_lds_of_a_perfect_linear_datamodel_is_one():
    gen = torch.Generator().manual_seed(0)
    tau = torch.randn(5, 30, generator=gen)
    masks = random_subsets(30, 60, 0.5, seed=1)
    gt = _linear_truth(tau, masks)
    assert dg.lds(tau, gt).mean == pytest.approx(1.0)
    assert dg.lds(-tau, gt).mean == pytest.approx(-1.0)
    # a monotone distortion of the truth keeps the rank correlation at 1
    assert dg.lds(tau, GroundTruth(masks, torch.exp(gt.values))).mean == pytest.approx(1.0)


def test_lds_matches_scipy_spearman_per_query():
    gen = torch.Generator().manual_seed(2)
    tau = torch.randn(4, 20, generator=gen)
    masks = random_subsets(20, 50, 0.5, seed=3)
    values = torch.randn(50, 4, generator=gen)
    result = dg.lds(tau, GroundTruth(masks, values))
    want = [stats.spearmanr((masks.double() @ tau[q].double()).numpy(), -values[:, q].numpy())[0] for q in range(4)]
    np.testing.assert_allclose(result.per_query, want, rtol=1e-10)
    t = stats.t.ppf(0.975, 3) * np.std(want, ddof=1) / 2
    assert result.mean == pytest.approx(np.mean(want)) and result.high - result.mean == pytest.approx(t)


def test_lds_counts_constant_queries_as_zero_and_says_so():
    """A method that scores 9 of 10 queries with zeros must not get the LDS of the one it got right."""
    gen = torch.Generator().manual_seed(4)
    tau = torch.randn(10, 30, generator=gen)
    masks = random_subsets(30, 60, 0.5, seed=5)
    gt = _linear_truth(tau, masks)
    lazy = tau.clone()
    lazy[1:] = 0
    result = dg.lds(lazy, gt)
    assert result.mean == pytest.approx(0.1) and result.degenerate == 9
    assert "9 of 10 queries constant or NaN" in str(result)
    nan_truth = GroundTruth(masks, gt.values.clone())
    nan_truth.values[:, 3] = float("nan")
    assert dg.lds(tau, nan_truth).degenerate == 1
    with pytest.raises(dg.DunegrassError, match="undefined: for all 10 queries"):
        dg.lds(torch.zeros(10, 30), gt)


def test_lds_rejects_mismatched_shapes():
    gt = GroundTruth(random_subsets(10, 5, 0.5, 0), torch.zeros(5, 3))
    with pytest.raises(dg.DunegrassError, match="do not match the ground truth"):
        dg.lds(torch.zeros(3, 11), gt)


def test_metrics_refuse_top_k_scores_by_name():
    """They failed with torch's 'Could not infer dtype of TopScores'."""
    gt = GroundTruth(random_subsets(10, 5, 0.5, 0), torch.zeros(5, 3))
    top = dg.TopScores.from_scores(dg.Scores(torch.randn(3, 10)), 2)
    for call in (lambda: dg.lds(top, gt), lambda: dg.mislabel_auc(top, torch.zeros(10, dtype=torch.bool))):
        with pytest.raises(dg.DunegrassError, match="metrics take the scores of every training example"):
            call()


def test_a_nan_score_is_ranked_last_not_first():
    """torch.topk ranks NaN above everything: a diverged score was the query's top proponent (and opponent)."""
    from dunegrass.scores import TopKSink

    values = torch.tensor([[0.5, float("nan"), -2.0, 1.0], [float("nan"), float("nan"), 3.0, -1.0]])
    scores = dg.Scores(values)
    assert scores.top(2).indices.tolist() == [[3, 0], [2, 3]]
    assert scores.bottom(2).indices.tolist() == [[2, 0], [3, 2]]
    sink = TopKSink(2, 4, 3)
    sink.add(0, values[:, :2])
    sink.add(2, values[:, 2:])
    top = sink.result("m", {})
    assert top.top().indices[0].tolist() == [3, 0, 2] and top.top().indices[1, :2].tolist() == [2, 3]
    assert top.bottom().indices[0].tolist() == [2, 0, 3] and torch.isnan(top.top().values[1, 2])


def test_scores_index_and_convert_like_their_values():
    """``scores[q]`` raised 'Scores is not subscriptable'; np.asarray made a 0-d object array."""
    values = torch.randn(3, 5)
    scores = dg.Scores(values)
    assert torch.equal(scores[1], values[1]) and torch.equal(scores[:, 2], values[:, 2])
    assert [row.tolist() for row in scores] == values.tolist()
    as_array = np.asarray(scores)
    assert as_array.shape == (3, 5) and as_array.dtype == np.float32 and np.array_equal(as_array, values.numpy())
    assert np.asarray(scores, dtype=np.float64).dtype == np.float64
    assert np.shares_memory(np.asarray(scores), scores.values.numpy())
    assert not np.shares_memory(np.array(scores, copy=True), scores.values.numpy())
    # == compares contents (a RuntimeError from the tensors before), repr is short (the meta ran to pages)
    nan = dg.Scores(torch.tensor([[float("nan"), 1.0]]), method="m", meta={"seeds": list(range(1000))})
    assert nan == dg.Scores(torch.tensor([[float("nan"), 1.0]]), method="m", meta={"seeds": list(range(1000))})
    assert nan != dg.Scores(torch.tensor([[float("nan"), 2.0]]), method="m", meta={"seeds": list(range(1000))})
    assert scores != nan and repr(nan) == "Scores(method='m', shape=(1, 2))"
    top = dg.TopScores.from_scores(scores, 2)
    assert top == dg.TopScores.from_scores(dg.Scores(values), 2) and top != dg.TopScores.from_scores(nan, 1)
    assert repr(top) == "TopScores(method='', n_query=3, k=2, n_train=5)"


def test_subsets_have_the_requested_size_and_differ():
    masks = random_subsets(100, 50, 0.5, seed=0)
    assert masks.shape == (50, 100) and (masks.sum(1) == 50).all()
    assert len({tuple(m.nonzero()[:, 0].tolist()) for m in masks}) == 50
    assert torch.equal(masks, random_subsets(100, 50, 0.5, seed=0))


def test_mislabel_auc_known_values():
    flags = torch.tensor([1, 0, 1, 0, 0, 0], dtype=torch.bool)
    assert dg.mislabel_auc(torch.tensor([9.0, 1, 8, 2, 3, 4]), flags) == 1.0
    assert dg.mislabel_auc(torch.tensor([0.0, 1, 0.5, 2, 3, 4]), flags) == 0.0
    # one positive above all negatives, one below two of them: (4 + 2) / 8
    assert dg.mislabel_auc(torch.tensor([9.0, 1, 2.5, 2, 3, 4]), flags) == pytest.approx(6 / 8)
    with pytest.raises(dg.DunegrassError, match="both"):
        dg.mislabel_auc(torch.ones(3), torch.zeros(3, dtype=torch.bool))
    ties = torch.tensor([1.0, 1.0, 2.0, 0.0])  # a tie between a positive and a negative counts half
    assert dg.mislabel_auc(ties, torch.tensor([1, 0, 1, 0], dtype=torch.bool)) == pytest.approx(7 / 8)


def test_loo_correlation_and_mean_ci():
    eff = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    out = dg.loo_correlation(2 * eff + 1, eff)
    assert out["pearson"] == pytest.approx(1.0) and out["per_query_spearman"] == pytest.approx(1.0)
    ci = mean_ci(np.array([1.0, 2.0, 3.0]))
    assert ci.mean == 2.0 and ci.low == pytest.approx(2 - stats.t.ppf(0.975, 2) / np.sqrt(3))


def test_ground_truth_roundtrip_and_retraining_records_its_recipe(tiny_classification, tmp_path):
    model, train, test = tiny_classification
    task = dg.ClassificationTask()
    config = dg.TrainConfig(lr=1e-2, steps=5, batch_size=8)
    gt = dg.subset_retraining(model, task, train, test, config, num_subsets=4, num_seeds=2, seed=3)
    assert gt.masks.shape == (4, 40) and gt.values.shape == (4, 7)
    assert gt.config["train_config"]["lr"] == 1e-2 and len(gt.config["member_seeds"]) == 8
    gt.save(tmp_path / "gt.npz")
    back = GroundTruth.load(tmp_path / "gt.npz")
    assert torch.equal(back.masks, gt.masks) and torch.equal(back.values, gt.values) and back.config == gt.config
    again = dg.subset_retraining(model, task, train, test, config, num_subsets=4, num_seeds=2, seed=3)
    torch.testing.assert_close(again.values, gt.values)
