"""dg.LoGra / dg.FactGraSS on the digits-cnn model (Conv2d + BatchNorm) and the trainable-parameters rule."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import dunegrass as dg
from dunegrass.bench.tasks import digits_cnn


@pytest.fixture(scope="module")
def digits():
    """θ₀ of the digits-cnn task (briefly trained, eval mode), 40 training images and 6 queries (host)."""
    bt = digits_cnn(n_train=40, n_test=6, epochs=2.0)
    return bt.model, bt.task, bt.train, bt.test


def func_layer_gradients(model, layers, data) -> list[torch.Tensor]:
    """Per-example G = [∂W | ∂b] ``[n, d_out, in_dim]`` of each layer's cross-entropy, by torch.func (eval mode)."""
    names = [f"{la.name}.{p}" for la in layers for p in (("weight", "bias") if la.has_bias else ("weight",))]
    params = {n: p.detach() for n, p in model.named_parameters()}
    consts = {**{n: p for n, p in params.items() if n not in names}, **dict(model.named_buffers())}

    def one(theta, x, y):
        return F.cross_entropy(functional_call(model, {**consts, **theta}, (x[None],)), y[None])

    device = next(model.parameters()).device
    x, y = (t.to(device) for t in data)
    g = vmap(grad(one), in_dims=(None, 0, 0))({n: params[n] for n in names}, x, y)
    out = []
    for la in layers:
        weight = g[f"{la.name}.weight"].reshape(len(x), la.out_dim, -1)  # conv: [n, O, C·kh·kw]
        parts = [weight, g[f"{la.name}.bias"][:, :, None]] if la.has_bias else [weight]
        out.append(torch.cat(parts, dim=2))
    return out


PRESETS = {
    "logra": lambda m, t, **kw: dg.LoGra(m, t, k_in=6, k_out=4, **kw),
    "factgrass": lambda m, t, **kw: dg.FactGraSS(m, t, k=16, mask_size=(8, 6), **kw),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_scores_equal_block_influence_on_torch_func_gradients(digits, name, device):
    """Σ_l φ_{q,l}ᵀ (F_l + λ_l I)⁻¹ φ_{i,l}, φ = the layer's map applied to torch.func's per-example gradients."""
    model, task, train, queries = digits
    model = copy.deepcopy(model).to(device)
    attr = PRESETS[name](model, task, damping=0.3, batch_size=16).fit(train)
    featurizer = attr.featurizers[0]
    assert [(la.name, la.kind) for la in featurizer.layers] == [("0", "conv2d"), ("3", "conv2d"), ("7", "linear")]
    assert len(featurizer.blocks) == 3  # one block per layer
    scores = attr.score(queries).values
    assert scores.shape == (6, 40) and torch.isfinite(scores).all()

    g_train = func_layer_gradients(model, featurizer.layers, train)
    g_query = func_layer_gradients(model, featurizer.layers, queries)
    want = torch.zeros(6, 40, dtype=torch.float64)
    for comp, gt, gq in zip(featurizer.compressors, g_train, g_query):
        phi, psi = comp.map_gradient(gt).double().cpu(), comp.map_gradient(gq).double().cpu()
        fisher = phi.T @ phi / 40
        lam = 0.3 * torch.trace(fisher) / phi.shape[1]
        want += psi @ torch.linalg.solve(fisher + lam * torch.eye(phi.shape[1], dtype=torch.float64), phi.T)
    torch.testing.assert_close(scores.double().cpu(), want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))


def test_logra_features_are_the_map_of_torch_func_gradients(digits, device):
    model, task, train, _ = digits
    model = copy.deepcopy(model).to(device)
    featurizer = dg.LoGra(model, task, k_in=5, k_out=3).featurizers[0]
    state = {n: p.detach() for n, p in model.named_parameters()}

    def objective(m, b):
        return task.loss(task.outputs(m, b), b)

    batch = tuple(t[:8].to(device) for t in train)
    features = featurizer(model, state, batch, objective)
    want = [
        c.map_gradient(g) for c, g in zip(featurizer.compressors, func_layer_gradients(model, featurizer.layers, batch))
    ]
    torch.testing.assert_close(features.cpu(), torch.cat(want, dim=1).cpu(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_frozen_parameters_are_left_out_unless_named(digits, name, device):
    model, task, train, queries = digits
    model = copy.deepcopy(model).to(device)
    model[0].requires_grad_(False)  # a frozen first layer
    model[7].bias.requires_grad_(False)  # a frozen bias
    attr = PRESETS[name](model, task)
    featurizer = attr.featurizers[0]
    assert [(la.name, la.has_bias) for la in featurizer.layers] == [("3", False), ("7", False)]
    assert [(c.layer_in, c.layer_out, c.bias) for c in featurizer.compressors] == [(72, 16, False), (256, 10, False)]
    assert len(featurizer.blocks) == 2
    named = PRESETS[name](model, task, modules=["0", "7"]).featurizers[0]  # chosen layers are taken whole
    assert [(la.name, la.has_bias, la.in_dim) for la in named.layers] == [("0", False, 9), ("7", True, 257)]
    scores = attr.fit(train).score(queries).values
    assert scores.shape == (6, 40) and torch.isfinite(scores).all()


def test_selective_factgrass_masks_fit_on_conv_layers(digits, device):
    model, task, train, queries = digits
    model = copy.deepcopy(model).to(device)
    model.train()  # mask fitting and featurising run in eval mode and give the caller's mode back
    attr = dg.FactGraSS(model, task, k=16, mask_size=(8, 6), mask="selective", mask_examples=20).fit(train)
    conv = attr.featurizers[0].compressors[1]  # layer "3": 72 patch coordinates, 16 channels
    assert (conv.mask_in.in_dim, conv.mask_out.in_dim) == (72, 16) and conv.mask_in.fitted
    assert torch.isfinite(attr.score(queries).values).all()
    assert model.training
