import pytest
import torch

import dunegrass as dg
from dunegrass.eval import brittleness


def test_removing_true_proponents_hurts_more_than_random(tiny_classification):
    model, (x, y), _ = tiny_classification
    task = dg.ClassificationTask()
    config = dg.TrainConfig(lr=3e-2, steps=40, batch_size=10)
    # queries are copies of training examples: their own copies (and same-class neighbours) support them
    queries = (x[:4], y[:4])
    scores = dg.GradientInfluence(model, task).fit((x, y)).score(queries)
    out = brittleness(model, task, (x, y), queries, scores, config, ks=(5, 15), num_seeds=2)
    assert out["k"] == [5, 15] and out["n_queries"] == 4
    assert all(0 <= r <= 1 for r in out["flip_rate"] + out["random_flip_rate"])
    assert out["loss_increase"][1] > out["random_loss_increase"][1]
    assert out["loss_increase"][1] > out["loss_increase"][0] > 0


def test_scores_with_nan_are_refused(tiny_classification):
    """A NaN was removed as a 'top proponent' (argsort ranks it first)."""
    model, (x, y), _ = tiny_classification
    values = torch.randn(2, len(y))
    values[0, 3] = float("nan")
    with pytest.raises(dg.DunegrassError, match="scores hold NaN or inf"):
        brittleness(model, dg.ClassificationTask(), (x, y), (x[:2], y[:2]), dg.Scores(values), dg.TrainConfig(steps=1))
