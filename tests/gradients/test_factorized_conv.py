"""Factorised capture of nn.Conv2d layers and the trainable-parameters rule, against torch.func gradients."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import dunegrass as dg
from dunegrass.bench.models import cnn
from dunegrass.compress.factorized import FactGraSSCompressor, LoGraCompressor
from dunegrass.errors import DunegrassError
from dunegrass.gradients.factorized import capture_factors, conv_padding, conv_patches, factor_layers, layer_gradients

# F.conv2d's own note on padding="same" with an even kernel, not ours
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")


def func_gradients(model: nn.Module, objective, batch, names: list[str]) -> dict[str, torch.Tensor]:
    """Per-example gradients ``{name: [B, *shape]}`` by torch.func: vmap(grad) of each example's own objective."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    consts = {**{n: p for n, p in params.items() if n not in names}, **dict(model.named_buffers())}

    def one(theta, example):
        single = tuple(t.unsqueeze(0) for t in example)
        return objective(lambda x: functional_call(model, {**consts, **theta}, (x,)), single).sum()

    return vmap(grad(one), in_dims=(None, 0))({n: params[n] for n in names}, batch)


def head_objective(forward, batch):
    """A per-example loss with a non-linearity after the layer, so δ varies across positions."""
    x, target = batch
    out = torch.tanh(forward(x))
    return (out * target).flatten(1).sum(1) + out.pow(2).flatten(1).sum(1)


CONVS = {
    "bias": dict(in_channels=3, out_channels=4, kernel_size=3),
    "no-bias-stride-2-padding": dict(in_channels=3, out_channels=5, kernel_size=3, stride=2, padding=1, bias=False),
    "dilation-rectangular": dict(in_channels=2, out_channels=4, kernel_size=(3, 2), dilation=(2, 1), padding=(1, 2)),
    "same-even-kernel": dict(in_channels=2, out_channels=3, kernel_size=(2, 4), padding="same", dilation=(1, 2)),
    "valid-stride": dict(in_channels=2, out_channels=3, kernel_size=2, padding="valid", stride=(2, 3)),
}


@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv2d_gradients_equal_torch_func(name, device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(**CONVS[name])).to(device)  # the root module is never selected
    conv = model[0]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, conv.in_channels, 9, 11, generator=gen)
    target = torch.randn(conv(x.to(device)).shape, generator=gen)
    batch = (x.to(device), target.to(device))
    (layer,) = factor_layers(model)
    assert layer.kind == "conv2d" and layer.has_bias == (conv.bias is not None)
    kh, kw = conv.kernel_size
    assert (layer.in_features, layer.out_dim) == (conv.in_channels * kh * kw, conv.out_channels)
    (g,) = layer_gradients(model, [layer], head_objective, batch)
    assert g.shape == (4, layer.out_dim, layer.in_dim)
    names = ["0.weight", "0.bias"] if layer.has_bias else ["0.weight"]
    want = func_gradients(model, head_objective, batch, names)
    got = {f"0.{key}": value for key, value in layer.split_gradient(g).items()}
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key].cpu(), want[key].cpu(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CONVS))
def test_patches_are_f_unfold(name):
    conv = nn.Conv2d(**CONVS[name])
    x = torch.randn(2, conv.in_channels, 9, 11)
    padded = F.pad(x, conv_padding(conv))  # F.unfold takes no "same"
    want = F.unfold(padded, conv.kernel_size, dilation=conv.dilation, stride=conv.stride).transpose(1, 2)
    got = conv_patches(conv, x)
    assert got.is_contiguous()
    torch.testing.assert_close(got, want)


def test_small_cnn_every_layer_equals_torch_func(device):
    """conv + BatchNorm2d (eval mode) + ReLU, strided conv + BatchNorm2d + ReLU, linear: all three captured."""
    model = cnn(seed=0).to(device)
    with torch.no_grad():  # non-trivial running statistics, as after training
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 1, 8, 8, generator=gen), torch.randint(0, 10, (6,), generator=gen)
    batch = (x.to(device), y.to(device))

    def loss(forward, b):
        return F.cross_entropy(forward(b[0]), b[1], reduction="none")

    layers = factor_layers(model)
    assert [(la.name, la.kind) for la in layers] == [("0", "conv2d"), ("3", "conv2d"), ("7", "linear")]
    assert [la.has_bias for la in layers] == [False, False, True]
    names = ["0.weight", "3.weight", "7.weight", "7.bias"]
    want = func_gradients(model, loss, batch, names)
    for layer, g in zip(layers, layer_gradients(model, layers, loss, batch)):
        for key, value in layer.split_gradient(g).items():
            torch.testing.assert_close(value.cpu(), want[f"{layer.name}.{key}"].cpu(), rtol=1e-4, atol=1e-6)


def test_compressors_on_conv_factors_equal_their_map_of_g(device):
    """LoGra and FactGraSS take the conv factors [B, L, C·kh·kw], [B, L, O] unchanged (bias column included)."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1)).to(device)
    x = torch.randn(3, 3, 8, 8).to(device)
    batch = (x, torch.randn(3, 6, 4, 4).to(device))
    (layer,) = factor_layers(conv)
    comps = [
        LoGraCompressor(layer.in_dim, layer.out_dim, k_in=5, k_out=4, seed=0, bias=True),
        FactGraSSCompressor(layer.in_dim, layer.out_dim, k=12, mask_in=9, mask_out=4, seed=1, bias=True),
    ]
    (g,) = layer_gradients(conv, [layer], head_objective, batch)
    factors = []

    def keep(i, a, d):
        assert a.shape == (3, 16, 27) and d.shape == (3, 16, 6) and not d.is_contiguous()  # δ: a transposed view
        factors.append((a, d))

    capture_factors(conv, [layer], head_objective, batch, keep)
    for comp in comps:
        torch.testing.assert_close(comp(*factors[0]).cpu(), comp.map_gradient(g).cpu(), rtol=1e-4, atol=1e-5)


class Mixed(nn.Module):
    """A dense conv, a depthwise conv, a reflect-padded conv and a linear head."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Conv2d(2, 4, 3, padding=1)
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.reflect(self.depthwise(self.dense(x))).mean((2, 3)))


def test_default_selection_skips_grouped_and_padded_convs():
    model = Mixed()
    assert [la.name for la in factor_layers(model)] == ["dense", "head"]
    assert [la.name for la in factor_layers(model, nn.Conv2d)] == ["dense"]
    assert [la.name for la in factor_layers(model, "*")] == ["dense", "head"]


@pytest.mark.parametrize(
    ("modules", "message"),
    [
        ("depthwise", r"'depthwise' is a grouped Conv2d \(groups=4\); factorised capture supports nn.Linear"),
        ("reflect", "padding_mode='reflect'; factorised capture supports .*groups=1, padding_mode='zeros'"),
        (nn.Conv1d, "Conv1d is not supported"),
    ],
)
def test_unsupported_convs_named_explicitly_are_errors(modules, message):
    with pytest.raises(DunegrassError, match=message):
        factor_layers(Mixed(), modules)


def test_unbatched_conv_input_is_an_error():
    conv = nn.Sequential(nn.Conv2d(1, 2, 3))
    with pytest.raises(DunegrassError, match=r"batched \[B, C, H, W\]"):
        capture_factors(conv, factor_layers(conv), lambda m, b: m(b).sum().reshape(1), torch.randn(1, 5, 5), print)


def frozen_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    model[0].requires_grad_(False)  # a frozen first layer
    model[2].bias.requires_grad_(False)  # a frozen bias
    return model


def test_trainable_parameters_by_default_modules_to_choose():
    model = frozen_mlp()
    assert [(la.name, la.has_bias, la.in_dim) for la in factor_layers(model)] == [("2", False, 5), ("4", True, 7)]
    chosen = factor_layers(model, ["0", "2"])  # named: selected whole, frozen or not
    assert [(la.name, la.has_bias, la.in_dim) for la in chosen] == [("0", True, 5), ("2", True, 6)]


def test_frozen_layers_captured_when_named():
    """A frozen layer named in modules= still gets its true per-example gradient (torch.func agrees)."""
    model = frozen_mlp()
    x, y = torch.randn(5, 4), torch.randn(5, 3)
    layers = factor_layers(model, ["0", "2"])

    def mse(forward, b):
        return (forward(b[0]) - b[1]).pow(2).sum(1)

    want = func_gradients(model, mse, (x, y), ["0.weight", "0.bias", "2.weight", "2.bias"])
    with torch.no_grad():  # capture enables grad itself
        grads = layer_gradients(model, layers, mse, (x, y))
    for layer, g in zip(layers, grads):
        for key, value in layer.split_gradient(g).items():
            torch.testing.assert_close(value, want[f"{layer.name}.{key}"], rtol=1e-5, atol=1e-6)


def test_a_fully_frozen_model_says_how_to_choose():
    model = frozen_mlp().requires_grad_(False)
    with pytest.raises(DunegrassError, match=r"is frozen .*trainable parameters by default.*modules=\[\.\.\.\]"):
        factor_layers(model)


def test_trainable_parameters_no_layer_captures_are_named_once(monkeypatch):
    """A BatchNorm's scale and shift are trainable but not captured by the factorised methods: said once."""
    from dunegrass import notices

    monkeypatch.setattr(notices, "_said", set())
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    with pytest.warns(dg.DunegrassWarning, match=r"16 trainable parameters in 2 other tensors \(1.weight, 1.bias\)"):
        factor_layers(model)
    model[1].requires_grad_(False)  # frozen: nothing is left out, nothing is said
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        factor_layers(model)


def test_a_bias_beside_a_frozen_weight_is_named_as_such(monkeypatch):
    """It was reported as a layer the factorised methods do not know (an nn.Linear is one)."""
    from dunegrass import notices

    monkeypatch.setattr(notices, "_said", set())
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    model[1].weight.requires_grad_(False)
    model[2].weight.requires_grad_(False)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert [layer.name for layer in factor_layers(model)] == ["0"]
    note, other = sorted(str(w.message) for w in said)
    assert other.startswith("the factorised methods") and "(1.bias)" in other
    assert (
        note.startswith("1 trainable bias whose layer's weight is frozen (2.bias) is left out") and "modules=" in note
    )
