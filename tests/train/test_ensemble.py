import copy

import pytest
import torch

import dunegrass as dg
from dunegrass.train import EnsembleTrainer, Member, TrainConfig, batch_schedule, ensemble_outputs


def _sequential(model, task, data, member, config):
    """Train one copy with torch.optim on the member's own batch stream."""
    m = copy.deepcopy(model)
    steps = config.num_steps(len(member.indices))
    sched = batch_schedule(member, steps, config.batch_size)
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(m.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.Adam(
            m.parameters(), lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: config.lr_at(t, steps) / config.lr)
    x, y = data
    for t in range(steps):
        idx = sched[t]
        loss = task.loss(task.outputs(m, (x[idx], y[idx])), (x[idx], y[idx])).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        scheduler.step()
    return dict(m.named_parameters())


@pytest.mark.parametrize(
    "config",
    [
        TrainConfig(
            optimizer="adam", lr=1e-2, steps=25, batch_size=8, weight_decay=1e-3, schedule="cosine", warmup=0.2
        ),
        TrainConfig(optimizer="sgd", lr=5e-2, momentum=0.9, steps=25, batch_size=8, schedule="linear"),
    ],
)
def test_vmapped_ensemble_equals_training_members_one_by_one(tiny_classification, config):
    model, train, _ = tiny_classification
    task = dg.ClassificationTask()
    gen = torch.Generator().manual_seed(1)
    members = [Member(torch.randperm(40, generator=gen)[: 15 + 5 * j], seed=j) for j in range(4)]
    stacked = EnsembleTrainer(model, task, config).train(train, members, max_members=3)
    for j, member in enumerate(members):
        want = _sequential(model, task, train, member, config)
        for name, p in want.items():
            torch.testing.assert_close(stacked[name][j], p.detach(), rtol=1e-4, atol=1e-5)


def test_members_differ_and_do_not_depend_on_grouping(tiny_classification):
    model, train, test = tiny_classification
    task = dg.ClassificationTask()
    config = TrainConfig(lr=1e-2, steps=10, batch_size=8)
    members = [Member(torch.arange(40), seed=s) for s in range(3)]
    a = EnsembleTrainer(model, task, config).train(train, members)
    b = EnsembleTrainer(model, task, config).train(train, members, max_members=1)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a["0.weight"][0], a["0.weight"][1]), "seeds must give different batch orders"
    losses = ensemble_outputs(model, task, a, test, fn=task.loss)
    assert losses.shape == (3, 7)


def test_non_finite_training_is_reported(tiny_classification):
    model, (x, y), _ = tiny_classification
    x = x.clone()
    x[:, 0] = float("inf")
    config = TrainConfig(optimizer="sgd", lr=0.1, steps=5, batch_size=8)
    with pytest.raises(dg.NonFiniteError, match="ensemble training gradient"):
        EnsembleTrainer(model, dg.ClassificationTask(), config).train((x, y), [Member(torch.arange(40), 0)])
