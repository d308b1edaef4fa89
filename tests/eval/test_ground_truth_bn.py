"""Subset retraining of a BatchNorm CNN: members train in train mode and are measured with their own statistics."""

from __future__ import annotations

import copy

import torch

import dunegrass as dg
from dunegrass.bench.models import cnn
from dunegrass.eval.ground_truth import random_subsets, subset_retraining
from dunegrass.seeding import derive_seed
from dunegrass.train import Member, TrainConfig, batch_schedule, reinitialize
from dunegrass.train.ensemble import load_member


def retrain_plainly(model, task, train, member, config):
    """One member from scratch with torch.optim, in train mode: a fresh copy of ``model`` (eval mode after)."""
    m = load_member(copy.deepcopy(model), {k: v[None] for k, v in reinitialize(model, member.seed).items()}, 0)
    m.train()
    device = next(m.parameters()).device
    opt = torch.optim.Adam(m.parameters(), lr=config.lr)
    x, y = train
    for idx in batch_schedule(member, config.num_steps(len(member.indices)), config.batch_size):
        batch = (x[idx].to(device), y[idx].to(device))
        loss = task.loss(m(batch[0]), batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def test_subset_retraining_of_a_batchnorm_cnn_equals_plain_retraining(device):
    gen = torch.Generator().manual_seed(0)
    train = (torch.randn(24, 1, 8, 8, generator=gen), torch.randint(0, 10, (24,), generator=gen))
    queries = (torch.randn(5, 1, 8, 8, generator=gen), torch.randint(0, 10, (5,), generator=gen))
    model = cnn(channels=(4, 6), seed=0).to(device).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = dg.ClassificationTask()
    config = TrainConfig(optimizer="adam", lr=1e-2, steps=5, batch_size=8)

    gt = subset_retraining(model, task, train, queries, config, num_subsets=3, alpha=0.5, seed=7)

    masks = random_subsets(24, 3, 0.5, 7)
    assert torch.equal(gt.masks, masks)
    for j in range(3):
        member = Member(masks[j].nonzero()[:, 0], derive_seed(7, j, 0))
        retrained = retrain_plainly(model, task, train, member, config)
        assert int(retrained[1].num_batches_tracked) == 5
        with torch.no_grad():
            want = task.query_loss(retrained(queries[0].to(device)), (queries[0], queries[1].to(device)))
        torch.testing.assert_close(gt.values[j].cpu(), want.cpu(), rtol=1e-4, atol=1e-5)
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
