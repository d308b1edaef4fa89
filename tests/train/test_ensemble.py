import copy

import pytest
import torch

import dunegrass as dg
from dunegrass.bench.models import cnn
from dunegrass.modes import running_stat_names
from dunegrass.train import EnsembleTrainer, Member, TrainConfig, batch_schedule, ensemble_outputs, reinitialize
from dunegrass.train.ensemble import load_member


def _sequential(model, task, data, member, config, train_mode=None):
    """Train one copy with torch.optim on the member's own batch stream: ``{name: tensor}`` of its parameters
    and buffers. ``train_mode``: the mode to train in (None: the model's)."""
    m = copy.deepcopy(model)
    if train_mode is not None:
        m.train(train_mode)
    device = next(m.parameters()).device
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
        batch = (x[sched[t]].to(device), y[sched[t]].to(device))
        loss = task.loss(task.outputs(m, batch), batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        scheduler.step()
    return {**dict(m.named_parameters()), **dict(m.named_buffers())}


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


def bn_setup(device, n: int = 40):
    """A small BatchNorm CNN (on the device, in eval mode as θ₀ is) and [n, 1, 8, 8] images (on the host)."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    model = cnn(channels=(4, 6), seed=0).to(device).eval()
    with torch.no_grad():  # θ₀'s running statistics, distinct from a fresh model's
        model[1].running_mean.fill_(0.3)
        model[4].running_var.fill_(2.0)
    members = [Member(torch.randperm(n, generator=gen)[: 20 + 5 * j], seed=j) for j in range(3)]
    return model, (x, y), members


def test_batchnorm_ensemble_in_train_mode_equals_a_plain_loop(device):
    """Each member normalises with its batches' statistics and updates its own running statistics."""
    model, train, members = bn_setup(device)
    before = {n: b.clone() for n, b in model.named_buffers()}
    task = dg.ClassificationTask()
    config = TrainConfig(optimizer="adam", lr=1e-2, steps=12, batch_size=8, weight_decay=1e-3, schedule="cosine")
    stacked = EnsembleTrainer(model, task, config, train_mode=True).train(train, members, max_members=2)
    assert set(running_stat_names(model)) <= set(stacked)
    for j, member in enumerate(members):
        want = _sequential(model, task, train, member, config, train_mode=True)
        assert int(want["1.num_batches_tracked"]) == 12
        for name, value in want.items():
            torch.testing.assert_close(stacked[name][j].cpu(), value.detach().cpu(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(stacked["4.running_mean"][0], stacked["4.running_mean"][1])
    assert not model.training  # the caller's model: its mode and buffers as they were
    for name, value in model.named_buffers():
        assert torch.equal(value, before[name]), name


def test_the_model_mode_by_default_eval_mode_keeps_running_statistics(device):
    """train_mode=None trains in the model's mode: eval mode (Daunce's choice) uses θ₀'s running statistics."""
    model, train, members = bn_setup(device)
    task = dg.ClassificationTask()
    config = TrainConfig(optimizer="sgd", lr=5e-2, momentum=0.9, steps=8, batch_size=8)
    stacked = EnsembleTrainer(model, task, config).train(train, members[:2])
    for j, member in enumerate(members[:2]):
        want = _sequential(model, task, train, member, config)
        for name, value in want.items():
            torch.testing.assert_close(stacked[name][j].cpu(), value.detach().cpu(), rtol=1e-4, atol=1e-5)
    assert torch.equal(stacked["1.running_mean"][1], model[1].running_mean)


def test_members_are_evaluated_in_eval_mode_with_their_own_statistics(device):
    model, (x, y), members = bn_setup(device)
    task = dg.ClassificationTask()
    config = TrainConfig(lr=1e-2, steps=6, batch_size=8)
    init = {k: torch.stack([reinitialize(model, s)[k] for s in range(3)]) for k in reinitialize(model, 0)}
    assert torch.equal(init["1.running_mean"], torch.zeros(3, 4)) and torch.equal(
        init["1.running_var"], torch.ones(3, 4)
    )
    stacked = EnsembleTrainer(model, task, config, train_mode=True).train((x, y), members, init=init)
    model.train()  # evaluation switches to eval mode by itself and restores this
    got = ensemble_outputs(model, task, stacked, (x[:5], y[:5]), fn=task.loss)
    assert model.training
    for j in range(3):
        member = load_member(copy.deepcopy(model), stacked, j).eval()
        with torch.no_grad():
            want = task.loss(member(x[:5].to(device)), (x[:5], y[:5].to(device)))
        torch.testing.assert_close(got[j].cpu(), want.cpu(), rtol=1e-5, atol=1e-6)


def test_cumulative_batchnorm_is_refused_in_train_mode(device):
    model, train, members = bn_setup(device)
    model[1].momentum = None
    config = TrainConfig(lr=1e-2, steps=2, batch_size=8)
    with pytest.raises(dg.DunegrassError, match="'1' has momentum=None.*train_mode=False"):
        EnsembleTrainer(model, dg.ClassificationTask(), config, train_mode=True).train(train, members)


def test_submodule_modes_are_kept_by_default_and_restored(device):
    """train_mode=None honours a BatchNorm the caller froze in eval; True/False are undone module by module."""
    model, train, members = bn_setup(device)
    model.train()
    model[1].eval()  # frozen statistics in an otherwise training model
    config = TrainConfig(lr=1e-2, steps=3, batch_size=8)
    stacked = EnsembleTrainer(model, dg.ClassificationTask(), config).train(train, members[:2])
    assert torch.equal(stacked["1.running_mean"][0], model[1].running_mean)  # frozen: unchanged
    assert int(stacked["4.num_batches_tracked"][0]) == 3  # training: updated
    for train_mode in (True, False):
        EnsembleTrainer(model, dg.ClassificationTask(), config, train_mode=train_mode).train(train, members[:1])
        assert [m.training for m in model] == [True, False, True, True, True, True, True, True]


def test_train_mode_dropout_draws_a_mask_per_member_from_the_members_seeds(tiny_classification, device):
    """Dropout in train mode (a model as built): members with the same data and seed still differ (each draws
    its own masks), the result does not depend on the global generator, which is left as it was, and
    eval mode trains without dropout (identical members)."""
    _, train, _ = tiny_classification
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3))
    model = model.to(device)
    twins = [Member(torch.arange(40), 7), Member(torch.arange(40), 7)]
    config = TrainConfig(lr=1e-2, steps=4, batch_size=8)
    trainer = EnsembleTrainer(model, dg.ClassificationTask(), config)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    on_device = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    first = trainer.train(train, twins)
    assert not torch.equal(first["0.weight"][0], first["0.weight"][1])
    assert torch.equal(torch.get_rng_state(), state) and model.training
    if on_device is not None:  # the masks are drawn on the device: its generator is restored too
        assert torch.equal(torch.cuda.get_rng_state(device), on_device)
    torch.manual_seed(2)
    again = trainer.train(train, twins)
    assert all(torch.equal(first[n], again[n]) for n in first)
    plain = EnsembleTrainer(model, dg.ClassificationTask(), config, train_mode=False).train(train, twins)
    assert torch.equal(plain["0.weight"][0], plain["0.weight"][1])


def test_reinitialising_reaches_every_trainable_parameter_or_refuses():
    """transformers' Conv1D (no reset_parameters) kept θ₀'s trained weights in a 'from scratch' retraining, and
    so did a module's own nn.Parameter; now the first is drawn by the model's _init_weights, the second refused."""
    from dunegrass.hf import tiny_gpt2

    model = tiny_gpt2()
    theta0 = {n: p.detach() for n, p in model.named_parameters()}
    first, again, other = reinitialize(model, 1), reinitialize(model, 1), reinitialize(model, 2)
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight", "transformer.wte.weight"):
        assert not torch.equal(first[name], theta0[name]) and not torch.equal(first[name], other[name])
        assert torch.equal(first[name], again[name])

    class OwnWeights(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(3, 6))

        def forward(self, x):
            return x @ self.w.T

    with pytest.raises(dg.DunegrassError, match=r"cannot re-initialise w: .*from_scratch=False"):
        reinitialize(OwnWeights(), 0)
    # torch's attention re-initialises through its private _reset_parameters
    attention = torch.nn.MultiheadAttention(8, 2)
    assert not torch.equal(reinitialize(attention, 0)["in_proj_weight"], attention.in_proj_weight)
