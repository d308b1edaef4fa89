"""`dunegrass demo` as a user runs it: every method beats random scores against the same ground truth."""

import json

import pytest

from dunegrass import demo
from dunegrass.cli import main

TEST_SIZE = demo.DemoSettings(
    n_train=150,
    n_queries=24,
    hidden=16,
    epochs=10,
    num_subsets=40,
    num_seeds=1,
    trak_checkpoints=2,
    k=64,
    daunce_models=64,
)


def test_the_demo_command_writes_results_and_every_method_beats_random_scores(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "QUICK", TEST_SIZE)  # the quick preset at test size: the command path is the user's
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    on_disk = json.loads((tmp_path / "results.json").read_text())
    methods = on_disk["methods"]
    expected = {"TRAK", "TracIn", "GradientInfluence", "GraSS", "EKFAC", "ExactInfluence", "Daunce"}
    assert expected | {"BayesianInfluence"} == set(methods)
    noise = on_disk["baseline"]["random scores"]["lds"]
    assert abs(noise) < 0.1 and "random scores" in printed
    for name, row in methods.items():
        assert name in printed and row["seconds"] > 0
        assert row["lds_ci"][0] <= row["lds"] <= row["lds_ci"][1]
        assert row["lds"] > noise + 0.08, f"{name}: LDS {row['lds']:.3f} against random scores' {noise:.3f}"
    assert on_disk["ground_truth"]["num_subsets"] == 40 and "train_config" in on_disk["ground_truth"]
    html = (tmp_path / "report.html").read_text()
    # two plots, then three test digits, each with every method's 5 proponents and 5 opponents
    assert html.count('class="plot"') == 2 and html.count("data:image/png;base64,") == 2 + 3 * (1 + len(methods) * 10)
    assert all(html.count(f"<th>{name}</th>") == 3 for name in methods) and "positive score means" in html


def test_the_cli_says_what_it_does(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["demo", "--unknown-flag"])
    assert e.value.code == 2
