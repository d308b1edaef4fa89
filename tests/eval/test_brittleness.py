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
