"""The built-in BatchNorm CNN (digits-cnn) runs through every method, left in train mode by its user."""

import pytest
import torch

import dunegrass as dg
from dunegrass.bench import digits_cnn

METHODS = {
    "GradientInfluence": lambda m, t: dg.GradientInfluence(m, t, compressor="sjlt:256"),
    "GraSS": lambda m, t: dg.GraSS(m, t, k=256),
    "TRAK": lambda m, t: dg.TRAK(m, t, k=256),
    "TracIn": lambda m, t: dg.TracIn(m, t),
    "LoGra": lambda m, t: dg.LoGra(m, t, k_in=8, k_out=8),
    "FactGraSS": lambda m, t: dg.FactGraSS(m, t, k=64, mask_size=(16, 8)),
    "ExactInfluence": lambda m, t: dg.ExactInfluence(m, t, hessian="gauss_newton", damping=0.1),
    "Daunce": lambda m, t: dg.Daunce(m, t, num_models=16, steps=20, train_batch_size=32),
}


@pytest.fixture(scope="module")
def cnn():
    return digits_cnn(n_train=96, n_test=8, epochs=4.0)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_attributes_the_cnn(cnn, device, name):
    model = cnn.model.to(device).train()  # as a user might leave it
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = cnn.train
    queries = (x[:6], y[:6])  # copies of training examples: each should be among its own top proponents
    scores = METHODS[name](model, cnn.task).fit(cnn.train).score(queries)
    assert scores.shape == (6, 96) and torch.isfinite(scores.values).all()
    rank = (scores.values > scores.values[torch.arange(6), torch.arange(6)][:, None]).sum(1).float()
    assert rank.mean() < 96 * 0.1, f"{name}: the copied example ranks {rank.tolist()} of 96"
    assert model.training and all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())
