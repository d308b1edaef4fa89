"""Run kronfluence's K-FAC or EK-FAC on a job that benchmarks/ekfac.py wrote; runs in the peers' venv.

    <peers venv>/bin/python benchmarks/peers/kronfluence_run.py JOB_DIR

JOB_DIR holds ``spec.json`` (architecture, strategy, batch size), ``model.safetensors``, ``train.safetensors``
and ``queries.safetensors``; this writes ``scores.safetensors`` ([n_query, n_train]) and ``result.json``
(seconds spent fitting factors and scoring). The model is rebuilt from dunegrass's own definition
(``src/dunegrass/bench/models.py``, loaded by path: dunegrass is not installed here).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from safetensors.torch import load_file, save_file
from torch.utils.data import TensorDataset

HERE = os.path.dirname(os.path.abspath(__file__))


def models_module():
    path = os.path.join(HERE, "..", "..", "src", "dunegrass", "bench", "models.py")
    spec = importlib.util.spec_from_file_location("dunegrass_bench_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Classification(Task):
    """Cross-entropy as training loss and as measurement (``dg.ClassificationTask()``'s, every built-in task's);
    the true Fisher's targets drawn from the model (kronfluence's ``sample=True``)."""

    def compute_train_loss(self, batch, model, sample=False):
        inputs, labels = batch
        logits = model(inputs)
        if sample:
            with torch.no_grad():
                labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
        return F.cross_entropy(logits, labels, reduction="sum")

    def compute_measurement(self, batch, model):
        inputs, labels = batch
        return F.cross_entropy(model(inputs), labels, reduction="sum")


def main(job: str) -> None:
    with open(os.path.join(job, "spec.json")) as f:
        spec = json.load(f)
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    torch.manual_seed(0)  # kronfluence's draws come from the global generator: a run can be repeated
    model = getattr(models_module(), spec["arch"])(**spec["arch_args"])
    model.load_state_dict(load_file(os.path.join(job, "model.safetensors")))
    model.eval()
    train, queries = (
        load_file(os.path.join(job, "train.safetensors")),
        load_file(os.path.join(job, "queries.safetensors")),
    )
    train_set, query_set = TensorDataset(train["x"], train["y"]), TensorDataset(queries["x"], queries["y"])
    task = Classification()
    model = prepare_model(model, task)
    with tempfile.TemporaryDirectory() as out:
        analyzer = Analyzer(analysis_name="bench", model=model, task=task, cpu=True, output_dir=out)
        start = time.perf_counter()
        factor_args = FactorArguments(strategy=spec["strategy"], use_empirical_fisher=spec.get("fisher") == "empirical")
        analyzer.fit_all_factors(
            factors_name="f",
            dataset=train_set,
            per_device_batch_size=spec["batch_size"],
            factor_args=factor_args,
            overwrite_output_dir=True,
        )
        fit_seconds = time.perf_counter() - start
        start = time.perf_counter()
        score_args = ScoreArguments(damping_factor=None)  # 0.1 × mean eigenvalue, as dunegrass's damping=0.1
        analyzer.compute_pairwise_scores(
            scores_name="s",
            factors_name="f",
            query_dataset=query_set,
            train_dataset=train_set,
            per_device_query_batch_size=spec["batch_size"],
            per_device_train_batch_size=spec["batch_size"],
            score_args=score_args,
            overwrite_output_dir=True,
        )
        scores = analyzer.load_pairwise_scores("s")["all_modules"]
        score_seconds = time.perf_counter() - start
    save_file({"scores": scores.float().contiguous()}, os.path.join(job, "scores.safetensors"))
    with open(os.path.join(job, "result.json"), "w") as f:
        json.dump({"fit_seconds": fit_seconds, "score_seconds": score_seconds}, f)


if __name__ == "__main__":
    main(sys.argv[1])
