import json

import pytest

from dunegrass.cli import main
from dunegrass.demo import DemoSettings, run_demo


def test_demo_writes_results_and_report(tmp_path, capsys):
    tiny = DemoSettings(
        n_train=120, n_queries=12, hidden=16, epochs=5, num_subsets=8, num_seeds=1, trak_checkpoints=2, k=64
    )
    results = run_demo(out=str(tmp_path), settings=tiny, progress=False)
    printed = capsys.readouterr().out
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["methods"].keys() == results["methods"].keys()
    for name, row in on_disk["methods"].items():
        assert name in printed
        assert -1 <= row["lds"] <= 1 and row["lds_ci"][0] <= row["lds"] <= row["lds_ci"][1] and row["seconds"] > 0
    assert {"TRAK", "TracIn", "GradientInfluence", "ExactInfluence", "Daunce"} <= set(on_disk["methods"])
    assert on_disk["ground_truth"]["num_subsets"] == 8 and "train_config" in on_disk["ground_truth"]
    html = (tmp_path / "report.html").read_text()
    best = max(on_disk["methods"], key=lambda k: on_disk["methods"][k]["lds"])
    # three queries for the best method, and three more for Daunce (the one with standard errors)
    assert html.count("data:image/png;base64,") == (3 if best == "Daunce" else 6) and "<table>" in html
    assert "significantly positive" in html


def test_cli_parses_demo_and_bench(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "demo" in capsys.readouterr().out
