"""The digits-cnn built-in task: a BatchNorm CNN trained in train mode to θ₀ and used in eval mode."""

from __future__ import annotations

import torch

from dunegrass.bench import TASKS
from dunegrass.bench.models import cnn
from dunegrass.bench.tasks import digits_cnn, train_model
from dunegrass.task import ClassificationTask
from dunegrass.train import TrainConfig


def test_digits_cnn_is_registered_trained_and_in_eval_mode():
    bt = digits_cnn(n_train=96, n_test=48, epochs=3.0)
    assert TASKS["digits-cnn"] is digits_cnn and bt.name == "digits-cnn"
    assert bt.train[0].shape == (96, 1, 8, 8) and bt.test[0].shape == (48, 1, 8, 8)
    assert sum(p.numel() for p in bt.model.parameters()) < 20_000
    assert not bt.model.training
    steps = bt.train_config.num_steps(96)
    for bn in (bt.model[1], bt.model[4]):  # running statistics trained and copied into the model
        assert int(bn.num_batches_tracked) == steps
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    assert bt.accuracy() > 0.3  # chance is 0.1; three epochs on 96 images


def test_train_model_equals_a_plain_train_mode_loop():
    """θ₀'s parameters and running statistics: the ensemble trainer with one member = torch.optim in train mode."""
    from dunegrass.train import Member, batch_schedule

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 8, 8, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    config = TrainConfig(optimizer="adam", lr=1e-2, steps=6, batch_size=8)
    task = ClassificationTask()
    got = train_model(cnn(channels=(4, 6), seed=1), task, (x, y), config, seed=3)

    want = cnn(channels=(4, 6), seed=1).train()
    opt = torch.optim.Adam(want.parameters(), lr=config.lr)
    for idx in batch_schedule(Member(torch.arange(32), 3), 6, 8):
        loss = task.loss(want(x[idx]), (x[idx], y[idx])).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for (name, a), b in zip(got.state_dict().items(), want.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
