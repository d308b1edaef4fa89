"""benchmarks/gpu_smoke.py stays runnable: its quick form on the CPU (a GPU runs the full form)."""

import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_gpu_smoke_runs_on_the_cpu(tmp_path):
    out = tmp_path / "smoke.json"
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")}
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_smoke.py"), "--device", "cpu", "--quick", "--json"]
    done = subprocess.run([*cmd, str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(out.read_text())
    methods = {(r["model"], r["method"]) for r in doc["rows"]}
    assert len(methods) == 15, methods
    assert all(r["ok"] for r in doc["rows"]), [r for r in doc["rows"] if not r["ok"]]
    assert doc["retraining"]["ok"], doc["retraining"]  # train-mode dropout: deterministic, generator restored
    assert {r["method"] for r in doc["factorized"]["rows"]} == {"logra", "factgrass", "materialized"}
    assert "every method on cpu" in done.stdout
