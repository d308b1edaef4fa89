"""dg.LoGra / dg.FactGraSS end to end: equality with block influence on materialised features, invariances, masks."""

from __future__ import annotations

import pytest
import torch

import dunegrass as dg
from dunegrass.compress import SelectiveMask
from dunegrass.compress.factor_masks import FactorMaskConfig, fit_factor_masks
from dunegrass.errors import ConfigMismatchError, DunegrassError
from dunegrass.gradients.factorized import factor_layers, layer_gradients
from dunegrass.methods import mask_cache
from dunegrass.methods.factorized import FactGraSS, FactorizedFeaturizer, LoGra

transformers = pytest.importorskip("transformers")

from dunegrass.hf import tiny_gpt2  # noqa: E402

TASK = dg.CausalLMTask()


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2, seed=0)


PRESETS = {
    "logra": lambda m, **kw: LoGra(m, TASK, k_in=4, k_out=5, **kw),
    "factgrass": lambda m, **kw: FactGraSS(m, TASK, k=16, mask_size=(8, 6), **kw),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_scores_invariant_to_batch_size_and_padding_side(model, name, padded_batch):
    make = PRESETS[name]
    right = (
        make(model, batch_size=5)
        .fit(padded_batch(n=24, seed=0, side="right"))
        .score(padded_batch(n=4, seed=1, side="right"))
        .values
    )
    left = (
        make(model, batch_size=24)
        .fit(padded_batch(n=24, seed=0, side="left"))
        .score(padded_batch(n=4, seed=1, side="left"))
        .values
    )
    assert right.shape == (4, 24) and right.abs().max() > 0
    torch.testing.assert_close(right, left, rtol=1e-4, atol=1e-4 * float(right.abs().max()))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_scores_equal_block_influence_on_materialised_gradients(model, name, padded_batch):
    """Σ_l φ_{q,l}ᵀ (F_l + λ_l I)⁻¹ φ_{i,l} with φ = the layer's map applied to explicitly built G."""
    train, queries = padded_batch(n=24, seed=0, side="right"), padded_batch(n=4, seed=1, side="right")
    attr = PRESETS[name](model, damping=0.3).fit(train)
    featurizer = attr.featurizers[0]
    layers = factor_layers(model)

    def objective(m, b):
        return TASK.loss(TASK.outputs(m, b), b)

    g_train = layer_gradients(model, layers, objective, train)
    g_query = layer_gradients(model, layers, objective, queries)
    want = torch.zeros(4, 24, dtype=torch.float64)
    for comp, gt, gq in zip(featurizer.compressors, g_train, g_query):
        phi, psi = comp.map_gradient(gt).double(), comp.map_gradient(gq).double()
        fisher = phi.T @ phi / 24
        lam = 0.3 * torch.trace(fisher) / phi.shape[1]
        want += psi @ torch.linalg.solve(fisher + lam * torch.eye(phi.shape[1], dtype=torch.float64), phi.T)
    torch.testing.assert_close(
        attr.score(queries).values.double(), want, rtol=1e-3, atol=1e-4 * float(want.abs().max())
    )


def test_one_block_per_layer_and_config(model):
    attr = FactGraSS(model, TASK, k=16, mask_size=(8, 6))
    featurizer = attr.featurizers[0]
    assert isinstance(featurizer, FactorizedFeaturizer)
    assert featurizer.blocks == [(0, 16), (16, 32), (32, 48), (48, 64)]
    cfg = featurizer.config()
    assert [row[0] for row in cfg["layers"]][0] == "transformer.h.0.attn.c_attn"
    assert cfg["compressors"][0]["mask_in"]["out_dim"] == 8 and cfg["compressors"][0]["sjlt"]["out_dim"] == 16
    defaults = LoGra(model, TASK).featurizers[0].compressors[2]  # c_fc: 17 -> 64, capped from 64 × 64
    assert (defaults.proj_in.out_dim, defaults.proj_out.out_dim) == (17, 64)


@pytest.mark.parametrize("name", ["logra", "factgrass"])
def test_two_checkpoints_average_their_block_influence(model, name, padded_batch):
    """Σ_m w_m Σ_l φ_{z,m,l}ᵀ (F_{m,l} + λ_{m,l} I)⁻¹ φ_{i,m,l} by hand, each checkpoint with its own weights and
    projection seed."""
    state = {k: v.detach().clone() for k, v in model.named_parameters()}
    other = {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in state.items()}
    attr = PRESETS[name](model, checkpoints=[state, other], checkpoint_weights=[0.3, 0.7])
    seeds = [f.compressors[0].seed for f in attr.featurizers]
    assert len(attr.featurizers) == 2 and seeds[0] != seeds[1]
    train, queries = padded_batch(n=12, seed=0, side="right"), padded_batch(n=3, seed=1, side="right")
    got = attr.fit(train).score(queries).values.double()
    want = torch.zeros_like(got)
    for m, weight in enumerate((0.3, 0.7)):
        phi = torch.from_numpy(attr.stores[m].load()).double()
        q = attr.query_features(queries, m).cpu().double()
        for a, b in attr.featurizers[m].blocks:
            fisher = phi[:, a:b].T @ phi[:, a:b] / 12
            lam = 0.1 * torch.trace(fisher) / (b - a)
            solved = torch.linalg.solve(fisher + lam * torch.eye(b - a, dtype=torch.float64), phi[:, a:b].T)
            want += weight * q[:, a:b] @ solved
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * want.abs().max().item())
    for p, v in zip(model.parameters(), state.values()):  # the checkpoints never leak into the model
        assert torch.equal(p.detach(), v)


def test_materialised_options_are_rejected(model):
    with pytest.raises(DunegrassError, match="drop params="):
        LoGra(model, TASK, params=["transformer.wte.weight"])
    with pytest.raises(DunegrassError, match="mask must be one of 'random', 'selective'"):
        FactGraSS(model, TASK, mask="learned")


def test_fit_factor_masks_recovers_planted_coordinates():
    """Signal on rows {1, 4, 7} × columns {0, 3, 5}; row 9 and column 8 are large but identical in every
    example (high energy, no ranking information): the learned masks keep the signal, energy alone would not."""
    gen = torch.Generator().manual_seed(0)
    rows, cols = torch.tensor([1, 4, 7]), torch.tensor([0, 3, 5])
    u, v = torch.zeros(80, 12), torch.zeros(80, 10)
    u[:, rows] = torch.randn(80, 3, generator=gen)
    v[:, cols] = torch.randn(80, 3, generator=gen)
    grads = u[:, :, None] * v[:, None, :] + 0.05 * torch.randn(80, 12, 10, generator=gen)
    grads[:, 9, :] += 3.0
    grads[:, :, 8] += 3.0
    energy = grads.square().sum(0)
    assert 9 in torch.topk(energy.sum(1), 3).indices and 8 in torch.topk(energy.sum(0), 3).indices
    mask_out, mask_in = fit_factor_masks(grads, k_out=3, k_in=3, seed=0)
    assert isinstance(mask_out, SelectiveMask) and mask_out.fitted
    assert mask_out.indices.tolist() == rows.tolist()
    assert mask_in.indices.tolist() == cols.tolist()
    agreement = [h["holdout_agreement"] for h in mask_out.history]
    assert max(agreement) > agreement[0] + 0.1


def test_selective_masks_are_learned_cached_and_checked(model, tmp_path, padded_batch):
    train, queries = padded_batch(n=30, seed=0, side="right"), padded_batch(n=3, seed=1, side="right")
    cfg = FactorMaskConfig(max_rounds=2)

    def make():
        return FactGraSS(model, TASK, k=16, mask_size=(8, 6), mask="selective", mask_examples=20, mask_config=cfg)

    first = make().fit(train, cache_dir=tmp_path)
    comp = first.featurizers[0].compressors[0]
    assert isinstance(comp.mask_out, SelectiveMask) and comp.mask_out.out_dim == 6 and comp.mask_in.out_dim == 8
    assert (tmp_path / "ckpt-0" / "masks" / "key.json").exists()
    second = make().fit(train, cache_dir=tmp_path)  # masks and features come from the cache
    assert torch.equal(second.featurizers[0].compressors[0].mask_in.indices, comp.mask_in.indices)
    torch.testing.assert_close(second.score(queries).values, first.score(queries).values)
    with pytest.raises(ConfigMismatchError, match="selective masks cached"):
        make().fit(padded_batch(n=30, seed=5, side="right"), cache_dir=tmp_path)


def test_selective_mask_memory_guard(model, monkeypatch, padded_batch):
    monkeypatch.setattr(mask_cache, "MASK_FIT_BYTES", 1000)
    attr = FactGraSS(model, TASK, k=16, mask="selective", mask_examples=20)
    with pytest.raises(DunegrassError, match="lower mask_examples"):
        attr.fit(padded_batch(n=30, seed=0, side="right"))


def test_non_finite_features_name_their_layer(model, padded_batch, monkeypatch):
    attr = LoGra(model, TASK, k_in=4, k_out=5, progress=False)
    featurizer, broken = attr.featurizers[0], attr.featurizers[0].compressors[1]
    monkeypatch.setattr(broken, "_compress", lambda x, d: torch.full((x.shape[0], broken.k), float("nan")))
    with pytest.raises(dg.NonFiniteError, match=featurizer.layers[1].name):
        attr.fit(padded_batch(n=6, seed=0, side="right"))
