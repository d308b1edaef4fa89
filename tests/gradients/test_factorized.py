"""Factorised capture and the per-layer compressors against explicitly materialised per-example gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dunegrass as dg
from dunegrass.compress.factorized import FactGraSSCompressor, LoGraCompressor
from dunegrass.errors import DunegrassError
from dunegrass.gradients import per_sample_gradients
from dunegrass.gradients.factorized import capture_factors, factor_layers, layer_gradients

transformers = pytest.importorskip("transformers")

from dunegrass.hf import tiny_gpt2  # noqa: E402

TASK = dg.CausalLMTask()


def objective(model, batch):
    return TASK.loss(TASK.outputs(model, batch), batch)


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2, seed=0)


class TokenMLP(nn.Module):
    """A per-token LM with nn.Linear layers (one without bias) and one Linear used twice."""

    def __init__(self, vocab: int = 40, width: int = 12):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.hidden = nn.Linear(width, width)
        self.shared = nn.Linear(width, width)
        self.out = nn.Linear(width, vocab, bias=False)

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.hidden(self.embed(input_ids)))
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        return self.out(h)


def reference(model: nn.Module, layers, batch) -> list[torch.Tensor]:
    """Per-example G = [∂W | ∂b] ``[B, d_out, in_dim]`` per layer from torch.func (no factorisation)."""
    names = [f"{layer.name}.{p}" for layer in layers for p in (("weight", "bias") if layer.has_bias else ("weight",))]
    flat = per_sample_gradients(model, objective, batch, names)
    params, out, offset = dict(model.named_parameters()), [], 0
    for layer in layers:
        parts = []
        for p in ("weight", "bias") if layer.has_bias else ("weight",):
            shape = params[f"{layer.name}.{p}"].shape
            g = flat[:, offset : offset + shape.numel()].reshape(-1, *shape)
            offset += shape.numel()
            parts.append(
                g.transpose(1, 2) if p == "weight" and layer.transposed else g.unsqueeze(-1) if p == "bias" else g
            )
        out.append(torch.cat(parts, dim=2))
    return out


@pytest.mark.parametrize("side", ["right", "left"])
def test_conv1d_capture_equals_per_sample_gradients(gpt2, side, padded_batch):
    batch = padded_batch(side=side)
    layers = factor_layers(gpt2)
    assert [layer.name for layer in layers] == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
    ]  # the tied lm_head is skipped by default
    for got, want in zip(layer_gradients(gpt2, layers, objective, batch), reference(gpt2, layers, batch)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_linear_capture_with_bias_free_and_reused_layers(padded_batch):
    torch.manual_seed(0)
    model = TokenMLP()
    batch = padded_batch(n=4, t=6)
    layers = factor_layers(model)
    assert [(layer.name, layer.has_bias) for layer in layers] == [("hidden", True), ("shared", True), ("out", False)]
    for got, want in zip(layer_gradients(model, layers, objective, batch), reference(model, layers, batch)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_padding_contributes_nothing(gpt2, padded_batch):
    """A padded row's layer gradients equal those of the same sequence alone, unpadded."""
    layers = factor_layers(gpt2)
    for side in ("right", "left"):
        batch = padded_batch(side=side)
        padded = layer_gradients(gpt2, layers, objective, batch)
        for i in range(batch["input_ids"].shape[0]):
            keep = batch["attention_mask"][i].bool()
            alone = {"input_ids": batch["input_ids"][i, keep][None]}
            for g_pad, g_one in zip(padded, layer_gradients(gpt2, layers, objective, alone)):
                torch.testing.assert_close(g_pad[i], g_one[0], rtol=1e-4, atol=1e-6)


def features(model, compressors, batch):
    """Compressed features per layer via factorised capture."""
    layers = factor_layers(model)
    out = [None] * len(layers)

    def on(i, x, d):
        out[i] = compressors[i](x, d) if out[i] is None else out[i] + compressors[i](x, d)

    capture_factors(model, layers, objective, batch, on)
    return out


def test_factgrass_equals_sjlt_of_masked_materialised_gradient(gpt2, padded_batch):
    batch = padded_batch()
    layers = factor_layers(gpt2)
    comps = [
        FactGraSSCompressor(la.in_dim, la.out_dim, k=24, mask_in=8, mask_out=6, seed=i, bias=True)
        for i, la in enumerate(layers)
    ]
    for comp, phi, g in zip(comps, features(gpt2, comps, batch), reference(gpt2, layers, batch)):
        rows, cols = comp.mask_out.indices, comp.mask_in.indices
        assert rows.numel() == 6 and cols.numel() == 8 and phi.shape == (5, 24)
        masked = g[:, rows][:, :, cols]  # M_out G M_inᵀ
        want = dg.SparseJL(48, 24, seed=comp.sjlt.seed)(masked.reshape(5, -1))
        torch.testing.assert_close(phi, want, rtol=1e-4, atol=1e-6)


def test_logra_equals_kronecker_projection_of_materialised_gradient(gpt2, padded_batch):
    batch = padded_batch()
    layers = factor_layers(gpt2)
    comps = [LoGraCompressor(la.in_dim, la.out_dim, k_in=5, k_out=4, seed=i, bias=True) for i, la in enumerate(layers)]
    for comp, phi, g in zip(comps, features(gpt2, comps, batch), reference(gpt2, layers, batch)):
        p_out, p_in = comp.proj_out.matrix().T, comp.proj_in.matrix().T  # [k, d]
        want = g.reshape(5, -1) @ torch.kron(p_out, p_in).T  # (P_out ⊗ P_in) vec(G)
        assert phi.shape == (5, 20)
        torch.testing.assert_close(phi, want, rtol=1e-4, atol=1e-6)


def test_bias_column_kept_or_dropped_and_bias_free_layers(padded_batch):
    """The appended 1 is never materialised: masks that keep or drop it, and layers without bias, still match G."""
    torch.manual_seed(0)
    model = TokenMLP()
    batch = padded_batch(n=4, t=6)
    layers = factor_layers(model)  # hidden (bias), shared (bias, called twice), out (no bias)
    with_bias = dg.SelectiveMask(13, 3, indices=torch.tensor([0, 5, 12]))  # column 12 is the bias
    without = dg.SelectiveMask(13, 3, indices=torch.tensor([0, 5, 11]))
    comps = [
        FactGraSSCompressor(13, 12, k=6, mask_in=with_bias, mask_out=4, seed=0, bias=True),
        FactGraSSCompressor(13, 12, k=6, mask_in=without, mask_out=4, seed=1, bias=True),
        LoGraCompressor(12, 40, k_in=3, k_out=5, seed=2, bias=False),
    ]
    for comp, phi, g in zip(comps, features(model, comps, batch), reference(model, layers, batch)):
        torch.testing.assert_close(phi, comp.map_gradient(g), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "make", [lambda: FactGraSSCompressor(9, 7, k=8, mask_in=4, mask_out=3), lambda: LoGraCompressor(9, 7)]
)
def test_non_finite_factors_are_caught_or_left_to_the_caller(make):
    """A NaN in a kept factor column raises by default; with check_finite=False it reaches φ (the featuriser
    checks all layers once per batch), so skipping SparseJL's own check loses nothing."""
    comp = make()
    x, d = torch.randn(2, 5, 9), torch.randn(2, 5, 7)
    rows = comp.mask_out.indices if isinstance(comp, FactGraSSCompressor) else torch.arange(7)
    d[1, 2, rows[0]] = float("nan")
    with pytest.raises(dg.NonFiniteError, match="NaN or inf"):
        comp(x, d)
    phi = comp(x, d, check_finite=False)
    assert torch.isfinite(phi[0]).all() and not torch.isfinite(phi[1]).all()


def test_sizes_are_capped_at_the_layer_dims():
    comp = FactGraSSCompressor(layer_in=5, layer_out=3, k=4096)
    assert (comp.mask_out.out_dim, comp.mask_in.out_dim, comp.k) == (3, 5, 15)
    assert LoGraCompressor(layer_in=5, layer_out=3).k == 15


def to_linear(model: nn.Module) -> nn.Module:
    """A copy with every Conv1D replaced by the equivalent nn.Linear (weight transposed)."""
    from transformers.pytorch_utils import Conv1D

    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, Conv1D):
            linear = nn.Linear(module.nx, module.nf)
            with torch.no_grad():
                linear.weight.copy_(module.weight.T)
                linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, linear)
    return twin


def test_conv1d_and_linear_give_the_same_features(gpt2, padded_batch):
    twin = to_linear(gpt2)
    assert all(isinstance(la.module, nn.Linear) for la in factor_layers(twin))
    batch = padded_batch(side="left")
    layers = factor_layers(gpt2)
    for make in (
        lambda la, i: FactGraSSCompressor(la.in_dim, la.out_dim, k=16, mask_in=8, mask_out=8, seed=i, bias=True),
        lambda la, i: LoGraCompressor(la.in_dim, la.out_dim, k_in=4, k_out=4, seed=i, bias=True),
    ):
        comps = [make(la, i) for i, la in enumerate(layers)]
        for a, b in zip(features(gpt2, comps, batch), features(twin, comps, batch)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_hooks_removed_and_model_gradients_untouched(gpt2, padded_batch):
    model = copy.deepcopy(gpt2)
    marks = {n: torch.full_like(p, 7.0) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = marks[n].clone()
    layers = factor_layers(model)
    layer_gradients(model, layers, objective, padded_batch())
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, marks[n]), n
    assert all(not m._forward_hooks for m in model.modules())

    def failing(m, batch):
        objective(m, batch)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        layer_gradients(model, layers, failing, padded_batch())
    assert all(not m._forward_hooks for m in model.modules())


def test_frozen_weights_are_captured_when_named(gpt2, padded_batch):
    frozen = copy.deepcopy(gpt2).requires_grad_(False)
    batch = padded_batch()
    named = [layer.name for layer in factor_layers(gpt2)]
    with torch.no_grad():  # capture enables grad itself
        got = layer_gradients(frozen, factor_layers(frozen, named), objective, batch)
    for a, b in zip(got, layer_gradients(gpt2, factor_layers(gpt2), objective, batch)):
        torch.testing.assert_close(a, b)


def test_selection_by_name_pattern_and_type(gpt2):
    assert [la.name for la in factor_layers(gpt2, "transformer.h.0.mlp.c_fc")] == ["transformer.h.0.mlp.c_fc"]
    assert len(factor_layers(gpt2, "*.mlp.*")) == 2
    assert [la.name for la in factor_layers(gpt2, "lm_head")] == ["lm_head"]  # tied, but asked for by name
    model = TokenMLP()
    assert [la.name for la in factor_layers(model, nn.Linear)] == ["hidden", "shared", "out"]


@pytest.mark.parametrize(
    ("modules", "message"),
    [
        ("transformer.ln_f", "is a LayerNorm; factorised capture supports nn.Linear, nn.Conv2d"),
        ("transformer.wte", "is a Embedding"),
        ("no.such.layer", "has no module named 'no.such.layer'"),
        ("*.attn.q_proj", "matches no nn.Linear"),
        (nn.Embedding, "Embedding is not supported"),
        ([], "modules is empty"),
    ],
)
def test_unsupported_layers_get_clear_errors(gpt2, modules, message):
    with pytest.raises(DunegrassError, match=message):
        factor_layers(gpt2, modules)


def test_model_without_supported_layers_errors():
    with pytest.raises(DunegrassError, match="no layers factorised capture .* supports: it needs nn.Linear, nn.Conv2d"):
        factor_layers(nn.Sequential(nn.Embedding(4, 3), nn.ReLU()))


def test_examples_must_stay_on_dim_0():
    class Flattening(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.proj = nn.Embedding(10, 4), nn.Linear(4, 10)

        def forward(self, input_ids, attention_mask=None):
            h = self.embed(input_ids)
            return self.proj(h.reshape(-1, 4)).reshape(*input_ids.shape, 10)

    model = Flattening()
    with pytest.raises(DunegrassError, match="examples along dim 0"):
        layer_gradients(model, factor_layers(model), objective, {"input_ids": torch.randint(0, 10, (3, 5))})


class WithAttention(nn.Module):
    """Linear → nn.MultiheadAttention (whose out_proj.weight is used without calling the module) → Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.att, self.head = nn.Linear(4, 8), nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)

    def forward(self, x):
        h = self.emb(x)
        return self.head(self.att(h, h, h, need_weights=False)[0]).mean(1)


def _mse(model, batch):
    return (model(batch[0]) - batch[1]).pow(2).sum(1)


def test_layers_that_never_run_are_left_out_or_named():
    model, batch = WithAttention(), (torch.randn(3, 5, 4), torch.randn(3, 3))
    assert [layer.name for layer in factor_layers(model)] == ["emb", "head"]  # out_proj is not a call
    with pytest.raises(DunegrassError, match="never ran as modules.*att.out_proj"):
        capture_factors(model, factor_layers(model, ["emb", "att.out_proj"]), _mse, batch, lambda *a: None)


class InPlaceAfter(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x) * 1.0
        y = self.b(h)
        h.add_(5.0)  # changes b's input after b ran: its captured factor would be wrong
        return y + 0.0 * h.sum(1, keepdim=True)


def test_an_input_modified_in_place_after_the_layer_ran_is_an_error():
    model = InPlaceAfter()
    with pytest.raises(DunegrassError, match="modified in place"):
        capture_factors(model, factor_layers(model), _mse, (torch.randn(3, 4), torch.randn(3, 2)), lambda *a: None)


def test_the_layer_sizes_of_the_last_release_still_read_with_a_warning():
    comp = LoGraCompressor(5, 3)
    with pytest.warns(FutureWarning, match="layer_out"):
        assert comp.out_dim == 3  # the layer's width, not k: hence the new name
    with pytest.warns(FutureWarning, match="layer_in"):
        assert comp.in_dim == 5
