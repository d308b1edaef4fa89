"""Hugging Face integration (the [hf] extra): offline models, loading, LoRA layers, the LM benchmark's data."""

from __future__ import annotations

import ast
import os

import pytest
import torch

import dunegrass as dg
from dunegrass.errors import DunegrassError
from dunegrass.gradients import per_sample_gradients
from dunegrass.gradients.factorized import factor_layers, layer_gradients

transformers = pytest.importorskip("transformers")

from dunegrass.bench.lm import CharTokenizer, stdlib_docstrings  # noqa: E402
from dunegrass.hf import causal_lm_from_config, load_causal_lm, tiny_gpt2  # noqa: E402

TASK = dg.CausalLMTask()
SMALL = {"model_type": "gpt2", "vocab_size": 24, "n_positions": 12, "n_embd": 8, "n_layer": 1, "n_head": 2}


def objective(model, batch):
    return TASK.loss(TASK.outputs(model, batch), batch)


def test_the_hub_is_never_asked():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_models_from_a_config_are_seeded_and_eager():
    a, b, c = causal_lm_from_config(SMALL, seed=3), causal_lm_from_config(SMALL, seed=3), causal_lm_from_config(SMALL)
    assert not a.training and a.config._attn_implementation == "eager"
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert any(not torch.equal(p, r) for p, r in zip(a.parameters(), c.parameters()))
    same = causal_lm_from_config(transformers.GPT2Config(**{k: v for k, v in SMALL.items() if k != "model_type"}), 3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), same.parameters()))
    with pytest.raises(DunegrassError, match="needs 'model_type'"):
        causal_lm_from_config({"n_layer": 1})


def test_load_from_a_local_directory(tmp_path):
    model = causal_lm_from_config(SMALL, seed=1)
    model.save_pretrained(tmp_path / "m")
    loaded = load_causal_lm(tmp_path / "m")
    ids = torch.randint(0, 24, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(DunegrassError, match="not a local directory"):
        load_causal_lm(tmp_path / "missing")


def test_transformers_is_imported_lazily():
    """No dunegrass module imports transformers or peft at import time (they are the optional [hf] extra)."""
    root = os.path.dirname(dg.__file__)
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".py"):
                continue
            with open(os.path.join(folder, name)) as f:
                tree = ast.parse(f.read())
            for node in tree.body:
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                mods += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                assert not any(m.split(".")[0] in ("transformers", "peft") for m in mods), (name, mods)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft reads transformers' deprecated checkpointing flag
def test_lora_layers_are_captured_like_any_linear_layer():
    """peft's LoRA adapters are nn.Linear: their per-example gradients (frozen base) come out of the factors."""
    peft = pytest.importorskip("peft")
    base = tiny_gpt2(vocab_size=24, n_positions=12, n_embd=8, n_layer=1, seed=0)
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, lora_dropout=0.0
    )
    model = peft.get_peft_model(base, config).eval()
    with torch.no_grad():  # LoRA's B starts at zero; give it values so every gradient is non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    layers = factor_layers(model, ["*lora_A.default", "*lora_B.default"])
    assert len(layers) == 4 and not any(layer.has_bias for layer in layers)
    batch = {"input_ids": torch.randint(0, 24, (3, 9), generator=torch.Generator().manual_seed(1))}
    names = [f"{layer.name}.weight" for layer in layers]
    flat = per_sample_gradients(model, objective, batch, names)
    got = torch.cat([g.reshape(3, -1) for g in layer_gradients(model, layers, objective, batch)], dim=1)
    torch.testing.assert_close(got, flat, rtol=1e-5, atol=1e-7)


def test_lm_benchmark_corpus_and_tokenizer_are_offline_and_deterministic():
    docs = stdlib_docstrings(("json", "textwrap"))
    assert docs == sorted(docs) and len(docs) > 5
    assert all(len(doc) >= 80 for _, doc in docs)
    tok = CharTokenizer()
    text = "def f(x):\n\treturn x + 1  # ü"
    ids = tok.encode(text)
    assert tok.vocab_size == 96 and ids.dtype == torch.int64 and int(ids.max()) < 96
    assert tok.decode(ids) == "def f(x):\n    return x + 1  # ?"


def test_factorized_bench_runs_and_reports_every_column():
    from dunegrass.bench.factorized_bench import run

    doc = run(n_layer=1, vocab=64, batch=2, seq_len=8, steps=1, repeats=1, n_embd=24)
    assert doc["benchmark"] == "factorized"
    assert [r["method"] for r in doc["rows"]] == ["logra", "factgrass", "materialized"]
    for row in doc["rows"]:
        assert {"compress_seconds", "tokens_per_s", "ratio_vs_logra", "peak_rss_mb"} <= set(row)
        assert row["tokens_per_s"] > 0 and row["peak_rss_mb"] > 0
    assert doc["rows"][0]["ratio_vs_logra"] == 1.0
    assert [entry["layer"] for entry in doc["layers"]] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where no GPU is present")
def test_factorized_bench_on_a_missing_gpu_says_so():
    from dunegrass.bench.factorized_bench import run

    with pytest.raises(dg.DunegrassError, match="sees no CUDA device.*--device cpu"):
        run(n_layer=1, vocab=64, batch=2, seq_len=8, steps=1, repeats=1, n_embd=24, device="cuda")
