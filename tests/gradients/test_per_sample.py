import pytest
import torch

import dunegrass as dg
from dunegrass.gradients import per_sample_gradients, select_parameters


def _loss_fn(task):
    return lambda model, batch: task.loss(task.outputs(model, batch), batch)


def _autograd_loop(model, task, batch, names):
    params = dict(model.named_parameters())
    rows = []
    x, y = batch
    for i in range(x.shape[0]):
        loss = task.loss(task.outputs(model, (x[i : i + 1], y[i : i + 1])), (x[i : i + 1], y[i : i + 1]))[0]
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def test_per_sample_gradients_equal_autograd(tiny_classification):
    model, train, _ = tiny_classification
    task = dg.ClassificationTask()
    names = select_parameters(model)
    got = per_sample_gradients(model, _loss_fn(task), train, names, chunk_size=7)
    want = _autograd_loop(model, task, train, names)
    assert got.shape == (40, sum(p.numel() for p in model.parameters()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_parameter_subset_and_query_signal(tiny_classification):
    model, train, _ = tiny_classification
    task = dg.ClassificationTask(measurement="margin")
    names = ["2.weight"]
    objective = lambda m, b: task.query_loss(task.outputs(m, b), b)  # noqa: E731
    got = per_sample_gradients(model, objective, train, names)
    x, y = train
    logits = model(x[:1])
    margin = logits[0, y[0]] - logits[0].masked_fill(torch.arange(3) == y[0], -1e9).max()
    (g,) = torch.autograd.grad(-margin, [model[2].weight])
    torch.testing.assert_close(got[0], g.reshape(-1))


def test_unknown_parameter_names_are_named(tiny_classification):
    model, _, _ = tiny_classification
    with pytest.raises(dg.DunegrassError, match="unknown parameter names.*'nope'.*0.weight"):
        select_parameters(model, ["nope"])


def test_non_finite_gradient_names_the_example(tiny_classification):
    model, (x, y), _ = tiny_classification
    x = x.clone()
    x[3, 0] = float("nan")
    task = dg.ClassificationTask()
    with pytest.raises(dg.NonFiniteError, match=r"example\(s\) \[3\]"):
        per_sample_gradients(model, _loss_fn(task), (x, y), select_parameters(model))
