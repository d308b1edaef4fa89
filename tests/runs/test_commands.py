"""The command line as a user runs it: a model saved to a directory, JSON Lines data, fit, score, inspect."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

import dunegrass as dg
from dunegrass import cli
from dunegrass.runs.example import SENTENCES, save_tiny_lm, write_example

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def _tiny_lm_dir(path, chat: bool) -> None:
    save_tiny_lm(str(path), SENTENCES, chat=chat)


def _run(*args, cwd):
    """The command as a user runs it: a new process."""
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "dunegrass.cli", *args], capture_output=True, text=True, cwd=cwd, env=env
    )


class _Done:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _call(*args, cwd, capsys, monkeypatch):
    """The same command in this process (the same code path as the console script, without a start-up)."""
    monkeypatch.chdir(cwd)
    try:
        code = cli.main(list(args))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return _Done(code, out.out, out.err)


@pytest.mark.parametrize("chat", [False, True])
def test_fit_score_and_inspect_from_a_config_file(tmp_path, chat, capsys, monkeypatch):
    run = lambda *a: _call(*a, cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)  # noqa: E731
    _tiny_lm_dir(tmp_path / "model", chat)
    rows = [
        {"prompt": s.split(" ", 2)[0] + " " + s.split(" ", 2)[1], "completion": s.split(" ", 2)[2]} for s in SENTENCES
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "queries.jsonl").write_text(json.dumps(rows[3]) + "\n" + json.dumps(rows[7]) + "\n")
    (tmp_path / "run.toml").write_text(
        'model = "model"\ndata = "train.jsonl"\nmethod = "logra"\nname = "words"\ncache_dir = "runs"\n'
        "[method_options]\nk_in = 8\nk_out = 8\n"
    )
    fit = run("fit", "run.toml")
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "12 training examples" in fit.stdout and (tmp_path / "runs" / "words" / "run.json").exists()
    score = run("score", "run.toml", "--queries", "queries.jsonl", "--top_k", "3")
    assert score.returncode == 0, score.stderr[-3000:]
    out = tmp_path / "runs" / "words"
    with open(out / "top.csv") as f:
        table = list(csv.DictReader(f))
    best = [r for r in table if r["list"] == "top" and r["rank"] == "1"]
    # a query that copies a training example has that example as its top proponent
    assert [int(r["train_index"]) for r in best] == [3, 7]
    assert best[0]["train_text"] == best[0]["query_text"] == "the sun → rose over the hills"
    lines = [json.loads(line) for line in (out / "top.jsonl").read_text().splitlines()]
    assert len(lines) == len(table) == 2 * 2 * 3
    # the label is what the score says, whichever end of the ranking the row comes from
    sign = {"proponent": 1, "opponent": -1, "neither": 0}
    assert all(sign[r["kind"]] == (r["score"] > 0) - (r["score"] < 0) for r in lines)
    assert {r["list"] for r in lines} == {"top", "bottom"}
    top = dg.TopScores.load(out / "top.npz")
    assert top.top().indices[:, 0].tolist() == [3, 7] and top.n_train == 12
    report = (out / "report.html").read_text()
    assert "rose over the hills" in report and "positive score means" in report
    inspect = run("inspect", str(out))
    assert inspect.returncode == 0 and "every file checks out" in inspect.stdout, inspect.stdout + inspect.stderr
    assert "factorised blocks, relative damping 0.1" in inspect.stdout


def test_flags_override_the_config_and_bad_input_is_named(tmp_path, capsys, monkeypatch):
    run = lambda *a: _call(*a, cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)  # noqa: E731
    _tiny_lm_dir(tmp_path / "model", False)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    (tmp_path / "run.yaml").write_text("model: model\ndata: train.jsonl\nmethod: grass\n")
    fit = run("fit", "run.yaml", "--method", "gradient", "--method_options.compressor", "sjlt:64")
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert json.loads((tmp_path / "runs" / "default" / "run.json").read_text())["config"]["method"] == "gradient"
    (tmp_path / "table.csv").write_text("a,b\n")
    bad = run("fit", "run.yaml", "--data", "table.csv")
    assert bad.returncode == 1 and "cannot read data from table.csv" in bad.stderr
    # a missing file, a missing config and an unusable device are named, with no traceback
    for args, said in [
        (("fit", "run.yaml", "--data", "missing.jsonl"), "missing.jsonl does not exist"),
        (("fit", "nothere.toml"), "the config file nothere.toml does not exist"),
        (("fit", "run.yaml", "--device", "nodevice"), "device 'nodevice' is not usable here"),
        (("example", "."), "already holds model, train.jsonl, which the example would overwrite"),
    ]:
        done = run(*args)
        assert done.returncode == 1 and said in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert "--influence.batch_size" in run("fit", "--help").stdout


def test_a_corrupt_file_is_reported_by_inspect(tmp_path, capsys, monkeypatch):
    run = lambda *a: _call(*a, cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)  # noqa: E731
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    dg.GradientInfluence(model, dg.ClassificationTask(), compressor="gaussian:8").fit((x, y), cache_dir=tmp_path)
    shard = next((tmp_path / "ckpt-0" / "train").glob("features-*.npy"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    inspect = run("inspect", str(tmp_path))
    assert inspect.returncode == 1 and "corrupt" in inspect.stdout and "1 store(s) with problems" in inspect.stdout


def test_data_as_a_saved_hugging_face_dataset_and_as_tensors(tmp_path):
    from dunegrass.runs.loaders import load_data, load_model

    datasets = pytest.importorskip("datasets")
    _tiny_lm_dir(tmp_path / "model", False)
    loaded = load_model(str(tmp_path / "model"))
    datasets.Dataset.from_list([{"text": s} for s in SENTENCES]).save_to_disk(str(tmp_path / "hf"))
    from_hf = load_data(str(tmp_path / "hf"), loaded)
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    from_jsonl = load_data(str(tmp_path / "t.jsonl"), loaded)
    assert from_hf.texts == from_jsonl.texts == SENTENCES
    assert [from_hf.data[i]["input_ids"].tolist() for i in range(3)] == [
        from_jsonl.data[i]["input_ids"].tolist() for i in range(3)
    ]
    ids = torch.randint(1, 20, (5, 7))
    torch.save({"input_ids": ids}, tmp_path / "t.pt")
    import numpy as np

    np.savez(tmp_path / "t.npz", input_ids=ids.numpy())
    assert torch.equal(load_data(str(tmp_path / "t.npz"), loaded).data.tensors["input_ids"], ids)
    with pytest.raises(dg.DunegrassError, match="cannot read data from"):
        load_data(str(tmp_path / "t.pt"), loaded)


def test_the_readme_example_runs_as_written(tmp_path):
    """The README's copy-paste example, each command in its own process, as a user types them."""
    write_example(str(tmp_path / "ex"))
    ex = tmp_path / "ex"
    fit = _run("fit", "run.toml", cwd=ex)
    assert fit.returncode == 0, fit.stderr[-2000:]
    # dunegrass's notices are plain lines on the command line, not a warning pointing at the console script
    assert "dunegrass: note: the factorised methods" in fit.stderr and "sys.exit(main())" not in fit.stderr
    score = _run("score", "run.toml", "--queries", "queries.jsonl", cwd=ex)
    assert score.returncode == 0, score.stderr[-2000:]
    with open(ex / "runs" / "words" / "top.csv") as f:
        best = [r for r in csv.DictReader(f) if r["list"] == "top" and r["rank"] == "1"]
    assert [int(r["train_index"]) for r in best] == [3, 7]
    inspect = _run("inspect", "runs/words", cwd=ex)
    assert inspect.returncode == 0 and "every file checks out" in inspect.stdout


def test_a_sequence_classifier_from_a_directory(tmp_path, capsys, monkeypatch):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    save_tiny_lm(str(tmp_path / "model"), SENTENCES, chat=False)  # its tokenizer; the classifier replaces the LM
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2, num_labels=2, pad_token_id=0)
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "model")
    rows = [{"text": s, "label": int("the" in s.split())} for s in SENTENCES]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "q.jsonl").write_text(json.dumps(rows[0]) + "\n")
    run = lambda *a: _call(*a, cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)  # noqa: E731
    args = ["--model", "model", "--data", "train.jsonl", "--method", "grass", "--method_options.k", "32"]
    done = run("score", *args, "--queries", "q.jsonl", "--top_k", "2", "--dense")  # a bare boolean flag
    assert done.returncode == 0, done.stderr
    assert dg.Scores.load(tmp_path / "runs" / "default" / "scores.npz").shape == (1, 12)
    # a score with no fit before it fitted the run: it records the fit, so --run finds its settings
    recorded = json.loads((tmp_path / "runs" / "default" / "run.json").read_text())["config"]
    assert recorded["method"] == "grass" and "queries" not in recorded
    again = run("score", "--run", "runs/default", "--queries", "q.jsonl", "--out", "again")
    assert again.returncode == 0 and (tmp_path / "again" / "top.npz").exists(), again.stderr
    table = list(csv.DictReader(open(tmp_path / "runs" / "default" / "top.csv")))
    assert len(table) == 4 and table[0]["query_text"] == SENTENCES[0]
    top = dg.TopScores.load(tmp_path / "runs" / "default" / "top.npz")
    assert top.top().indices[0, 0] == 0  # the query is training example 0


def test_the_bayesian_influence_function_from_the_command_line(tmp_path, capsys, monkeypatch):
    run = lambda *a: _call(*a, cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)  # noqa: E731
    _tiny_lm_dir(tmp_path / "model", False)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    args = ["--model", "model", "--data", "train.jsonl", "--method", "bif", "--bif.chains", "2", "--bif.draws", "6"]
    fit = run("fit", *args, "--bif.lr", "1e-3")
    assert fit.returncode == 0, fit.stderr[-3000:]
    config = json.loads((tmp_path / "runs" / "default" / "run.json").read_text())["config"]
    assert config["method"] == "bif" and config["bif"]["chains"] == 2 and config["bif"]["lr"] == 1e-3
    score = run("score", *args, "--bif.lr", "1e-3", "--queries", "train.jsonl", "--top_k", "2")
    assert score.returncode == 0, score.stderr[-3000:]
    top = dg.TopScores.load(tmp_path / "runs" / "default" / "top.npz")
    assert top.n_train == len(SENTENCES) and top.method == "bif"


def test_score_takes_a_fits_settings_from_its_run_directory(tmp_path, capsys, monkeypatch):
    """``dunegrass score --run DIR`` from another directory: the fit's flags are not repeated, its relative
    paths still resolve, and the run's cache is found (a different k_in would be a config mismatch)."""
    run = lambda *a, cwd=tmp_path: _call(*a, cwd=cwd, capsys=capsys, monkeypatch=monkeypatch)  # noqa: E731
    _tiny_lm_dir(tmp_path / "model", False)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    fit = run("fit", "--model", "model", "--data", "train.jsonl", "--method", "logra", "--name", "words",
              "--method_options.k_in", "8", "--method_options.k_out", "8")  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "q.jsonl").write_text(json.dumps({"text": SENTENCES[5]}) + "\n")
    score = run("score", "--run", "../runs/words", "--queries", "q.jsonl", "--top_k", "2", cwd=elsewhere)
    assert score.returncode == 0, score.stderr[-3000:]
    assert "with logra" in score.stdout
    top = dg.TopScores.load(tmp_path / "runs" / "words" / "top.npz")
    assert top.method == "logra" and top.n_train == len(SENTENCES) and top.top().indices[0, 0] == 5
    changed = run("score", "--run=../runs/words", "--method_options.k_in", "4", "--queries", "q.jsonl", cwd=elsewhere)
    assert changed.returncode == 1 and "proj_in.out_dim: cached 8, requested 4" in changed.stderr, changed.stderr[
        -2000:
    ]
    assert "new run (dunegrass fit" in changed.stderr
    # named as the flag the user typed; the model and data paths, relative to another directory, are unchanged
    assert "Changed since the fit (run.json): --method_options.k_in 4 (fitted: 8). To" in changed.stderr
    other = run("score", "--run", "../runs/words", "--method", "grass", "--queries", "q.jsonl", cwd=elsewhere)
    assert other.returncode == 1 and "is a logra run; --method grass needs its own fit" in other.stderr
    missing = run("score", "--run", "nowhere", "--queries", "q.jsonl", cwd=elsewhere)
    assert missing.returncode == 1 and "nowhere has no run.json" in missing.stderr


LORA_FLAGS = [
    (["--daunce.lora", "true"], 64, None),
    (["--bif.lora", "--device", "cpu"], None, 64),
    (["--daunce.lora", "false"], None, None),
    (["--bif.lora.rank", "4"], None, 4),
    (["--daunce.lora=true", "--bif.lora=false"], 64, None),
]


@pytest.mark.parametrize(
    "config, flags, daunce_rank, bif_rank",
    # a flag's value is read as YAML whatever the config file's format, so a mapping works with TOML too
    [(c, *case) for c in ("flags", "toml", "yaml") for case in LORA_FLAGS]
    + [(c, ["--daunce.lora", "{rank: 8}", "--bif.lora", "True"], 8, 64) for c in ("flags", "toml", "yaml")],
)
def test_lora_is_switched_on_by_a_bare_or_true_flag(config, flags, daunce_rank, bif_rank, tmp_path):
    from dunegrass.runs.commands import parse
    from dunegrass.runs.config import FitConfig

    base = ["--model", "m", "--data", "d.jsonl"]
    if config != "flags":  # a config file switches the parser's mode, and with it how values are read
        (tmp_path / f"run.{config}").write_text('model = "m"\ndata = "d.jsonl"\n' if config == "toml" else "model: m\n")
        base = [str(tmp_path / f"run.{config}"), "--data", "d.jsonl"]
    cfg = parse(FitConfig, [*base, *flags], "dunegrass fit")
    assert (cfg.daunce.lora and cfg.daunce.lora.rank) == daunce_rank
    assert (cfg.bif.lora and cfg.bif.lora.rank) == bif_rank


@pytest.mark.parametrize("fmt", ["toml", "yaml"])
def test_lora_switched_on_in_a_config_file(fmt, tmp_path):
    """``lora = true`` under ``[daunce]`` (or ``lora: true``) was refused by the config's type check."""
    from dunegrass.runs.commands import parse
    from dunegrass.runs.config import FitConfig

    text = {
        "toml": 'model = "m"\ndata = "d.jsonl"\n[daunce]\nlora = true\n[bif]\nlora = false\n',
        "yaml": "model: m\ndata: d.jsonl\ndaunce:\n  lora: true\nbif:\n  lora: false\n",
    }[fmt]
    (tmp_path / f"run.{fmt}").write_text(text)
    cfg = parse(FitConfig, [str(tmp_path / f"run.{fmt}")], "dunegrass fit")
    assert cfg.daunce.lora == dg.LoraConfig() and cfg.bif.lora is None


def test_print_config_writes_toml_that_reads_back_and_files_are_read_by_their_extension(tmp_path, capsys):
    """``--print_config`` with a TOML config needed the third-party ``toml`` package (an ImportError); now it
    writes TOML that reads back to the same settings. A YAML file beside a TOML one is read as YAML."""
    import tomllib

    from dunegrass.runs.commands import parse
    from dunegrass.runs.config import FitConfig

    (tmp_path / "run.toml").write_text('model = "m"\ndata = "d.jsonl"\n[method_options]\nk_in = 8\n')
    (tmp_path / "more.yaml").write_text("method: daunce\ndaunce:\n  num_models: 4\n  lora: {rank: 8}\n")
    argv = [str(tmp_path / "run.toml"), "--config", str(tmp_path / "more.yaml"), "--method_options.modules", "[a, b.*]"]
    cfg = parse(FitConfig, argv, "dunegrass fit")
    assert (cfg.method, cfg.daunce.num_models, cfg.daunce.lora.rank) == ("daunce", 4, 8)
    assert (cfg.method_options.k_in, cfg.method_options.modules) == (8, ["a", "b.*"])
    with pytest.raises(SystemExit):
        parse(FitConfig, [*argv, "--print_config"], "dunegrass fit")
    printed = capsys.readouterr().out
    settings = tomllib.loads(printed)  # valid TOML, unset fields (None) as comments
    assert settings["daunce"]["num_models"] == 4 and settings["method_options"]["modules"] == ["a", "b.*"]
    assert "# weights = (none)" in printed
    (tmp_path / "printed.toml").write_text(printed)
    again = parse(FitConfig, [str(tmp_path / "printed.toml")], "dunegrass fit")
    assert again.to_dict() == cfg.to_dict()


def test_print_config_edge_cases_and_yaml_values_read_as_jsonargparse_reads_them(tmp_path, capsys):
    """Found in review: a YAML date-like value became a date (refused as a name); a TOML file without
    model/data could not print its settings; --print_config=skip_null printed YAML; an argument ending in .toml
    that is not a config file switched the print to TOML; a null setting was silently lost in TOML."""
    import tomllib

    from dunegrass.runs.commands import parse
    from dunegrass.runs.config import FitConfig

    (tmp_path / "dated.yaml").write_text("model: m\ndata: d.jsonl\nname: 2024-01-01\n")
    assert parse(FitConfig, [str(tmp_path / "dated.yaml")], "dunegrass fit").name == "2024-01-01"
    (tmp_path / "partial.toml").write_text("[influence]\ndamping = 0.2\n")

    def printed(*argv):
        with pytest.raises(SystemExit) as done:
            parse(FitConfig, list(argv), "dunegrass fit")
        assert done.value.code in (0, None)
        return capsys.readouterr()

    out = printed(str(tmp_path / "partial.toml"), "--print_config")
    assert tomllib.loads(out.out)["influence"]["damping"] == 0.2 and "# model = (none)" in out.out
    out = printed(str(tmp_path / "partial.toml"), "--print_config=skip_null")
    assert "(none)" not in out.out and tomllib.loads(out.out)["influence"]["damping"] == 0.2
    out = printed(str(tmp_path / "partial.toml"), "--model", "m", "--print_config=skip_default")
    assert tomllib.loads(out.out) == {"model": "m", "influence": {"damping": 0.2}}
    out = printed(str(tmp_path / "dated.yaml"), "--data", "x.toml", "--print_config")
    assert "data: x.toml" in out.out  # YAML: the config file is YAML
    out = printed(str(tmp_path / "partial.toml"), "--model", "m", "--influence.damping", "null", "--print_config")
    assert "damping" not in tomllib.loads(out.out)["influence"]
    assert "TOML cannot write null; give --influence.damping null" in out.err


def test_changed_settings_name_nested_flags_and_ignore_what_one_side_does_not_know():
    from dunegrass.runs.commands import changed_settings
    from dunegrass.runs.config import FitConfig

    fitted = FitConfig(model="m", data="d", method="daunce").to_dict()
    recipe = dg.DaunceOptions().recipe
    now = FitConfig(model="m", data="d", method="daunce", daunce=dg.DaunceOptions(train=recipe))
    assert changed_settings({"config": fitted}, now) == ""
    recipe.lr = 0.01
    assert changed_settings({"config": fitted}, now) == "--daunce.train.lr 0.01 (fitted: 0.001)"
    del fitted["daunce"]["train"]["lr"], fitted["influence"]["seed"]  # an older run.json
    assert changed_settings({"config": fitted}, now) == ""


def test_a_partial_recipe_changes_only_its_fields_and_files_never_override_flags(tmp_path, capsys):
    """From a new-user trial: --daunce.train.lr with LoRA replaced the whole LoRA recipe (AdamW, 1 epoch) by
    TrainConfig's defaults (Adam, 20 epochs); a config file given after a flag overrode the flag; a TOML file
    named without .toml was read as one YAML string ('Unexpected config')."""
    from dunegrass.options import DEFAULT_RECIPE, LORA_RECIPE
    from dunegrass.runs.commands import parse
    from dunegrass.runs.config import FitConfig

    base = ["--model", "m", "--data", "d.jsonl", "--method", "daunce"]
    lora = parse(FitConfig, [*base, "--daunce.lora", "--daunce.train.lr", "0.01"], "dunegrass fit").daunce.recipe
    assert lora.to_dict() == {**LORA_RECIPE.to_dict(), "lr": 0.01}
    plain = parse(FitConfig, [*base, "--daunce.train.batch_size", "8"], "dunegrass fit").daunce.recipe
    assert plain.to_dict() == {**DEFAULT_RECIPE.to_dict(), "batch_size": 8}
    (tmp_path / "run.cfg").write_text('model = "m"\ndata = "d.jsonl"\nname = "from-file"\n[daunce.train]\nlr = 0.02\n')
    cfg = parse(FitConfig, ["--name", "from-flag", "--method", "daunce", "--config", str(tmp_path / "run.cfg")], "x")
    assert cfg.name == "from-flag" and cfg.daunce.recipe.to_dict() == {**DEFAULT_RECIPE.to_dict(), "lr": 0.02}
    (tmp_path / "table.cfg").write_text("[influence]\ndamping = 0.3\n")  # a table first: a YAML parse error
    assert parse(FitConfig, [*base, "--config", str(tmp_path / "table.cfg")], "x").influence.damping == 0.3
    # --print_config (YAML here) shows the recipe the run uses, not TrainConfig's defaults
    (tmp_path / "run.yaml").write_text("model: m\ndata: d.jsonl\nmethod: daunce\n")
    with pytest.raises(SystemExit):
        parse(FitConfig, [str(tmp_path / "run.yaml"), "--daunce.train.lr", "0.01", "--print_config"], "x")
    printed = yaml.safe_load(capsys.readouterr().out)["daunce"]["train"]
    assert printed == {**DEFAULT_RECIPE.to_dict(), "lr": 0.01, "betas": list(DEFAULT_RECIPE.betas)}


def test_scoring_with_more_members_says_so_and_records_it(tmp_path, capsys, monkeypatch):
    """A score with a larger --daunce.num_models trained the new members silently and left run.json at the old
    count, so the next score --run used the old K."""
    run = lambda *a: _call(*a, cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)  # noqa: E731
    _tiny_lm_dir(tmp_path / "model", False)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    (tmp_path / "q.jsonl").write_text(json.dumps({"text": SENTENCES[2]}) + "\n")
    steps = ["--daunce.train.steps", "2"]
    fit = run("fit", "--model", "model", "--data", "train.jsonl", "--method", "daunce", "--name", "d",
              "--daunce.num_models", "3", *steps)  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-2000:]
    more = run("score", "--run", "runs/d", "--queries", "q.jsonl", "--daunce.num_models", "5", "--daunce.normalize")
    assert more.returncode == 0, more.stderr[-2000:]
    assert "trained 2 more members (3 → 5)" in more.stdout
    recorded = json.loads((tmp_path / "runs" / "d" / "run.json").read_text())["config"]["daunce"]
    assert recorded["num_models"] == 5 and recorded["normalize"] is False  # the count, not this score's settings
    same = run("score", "--run", "runs/d", "--queries", "q.jsonl")
    assert same.returncode == 0 and "more members" not in same.stdout
    assert dg.TopScores.load(tmp_path / "runs" / "d" / "top.npz").meta["num_models"] == 5


def test_a_recorded_run_gives_no_consent_and_old_or_unknown_settings_are_named(tmp_path):
    """``--run``: the fit's --yes (consent to a paid service's charges) is not carried over; a setting this
    version does not know is named and ignored; a missing value is an error, not the next flag."""
    from dunegrass.notices import DunegrassWarning
    from dunegrass.runs.commands import parse
    from dunegrass.runs.config import FitConfig, ScoreConfig

    record = FitConfig(model="gpt-4.1-mini", data="d.jsonl", method="daunce-api", yes=True).to_dict()
    record["removed_setting"] = 1
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "run.json").write_text(json.dumps({"command": "fit", "config": record}))
    with pytest.warns(DunegrassWarning, match="removed_setting"):
        cfg = parse(ScoreConfig, ["--run", str(tmp_path / "old"), "--queries", "q.jsonl"], "dunegrass score")
    assert cfg.method == "daunce-api" and cfg.yes is False and cfg.name == "old" and cfg.cache_dir == str(tmp_path)
    assert parse(ScoreConfig, ["--run", str(tmp_path / "old"), "--queries", "q.jsonl", "--yes"], "s").yes is True
    with pytest.raises(dg.DunegrassError, match="--run needs a value"):
        parse(ScoreConfig, ["--run", "--queries", "q.jsonl"], "dunegrass score")
    (tmp_path / "score.yaml").write_text(f"run: {tmp_path / 'old'}\nmodel: m\ndata: d.jsonl\nqueries: q.jsonl\n")
    with pytest.raises(dg.DunegrassError, match="command line only"):
        parse(ScoreConfig, [str(tmp_path / "score.yaml")], "dunegrass score")


def test_rows_are_labelled_by_the_sign_of_their_score_not_by_their_end_of_the_ranking():
    """A query every training example helps has positive scores at the bottom too: they are not opponents."""
    from dunegrass.runs.commands import ranked_rows

    scores = dg.Scores(torch.tensor([[3.0, 2.0, 1.0, 0.5], [2.0, 0.0, -1.0, -4.0]]))
    rows = ranked_rows(dg.TopScores.from_scores(scores, 2), None, None)
    got = {(r["query"], r["list"], r["rank"]): (r["train_index"], r["kind"]) for r in rows}
    assert got[(0, "top", 1)] == (0, "proponent") and got[(0, "bottom", 1)] == (3, "proponent")
    assert got[(1, "bottom", 1)] == (3, "opponent") and got[(1, "bottom", 2)] == (2, "opponent")
    assert got[(1, "top", 2)] == (1, "neither")


def test_method_options_the_method_does_not_read_are_named(monkeypatch):
    """The README's run.toml sets LoGra's k_in/k_out: with --method factgrass they were dropped without a word."""
    import warnings

    from dunegrass import notices
    from dunegrass.runs.commands import say_ignored_options
    from dunegrass.runs.config import FitConfig, MethodOptions

    monkeypatch.setattr(notices, "_said", set())
    options = MethodOptions(k_in=8, k_out=8, k=128)
    with pytest.warns(dg.DunegrassWarning, match=r"k_in, k_out do not apply to --method factgrass"):
        say_ignored_options(FitConfig(model="m", data="d", method="factgrass", method_options=options))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        say_ignored_options(FitConfig(model="m", data="d", method="logra", method_options=MethodOptions(k_in=8)))


def test_a_max_length_that_cuts_off_the_completion_is_refused(tmp_path, capsys, monkeypatch):
    """The cut left no token with a loss: every score was 0 in a normal-looking report."""
    run = lambda *a: _call(*a, cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)  # noqa: E731
    _tiny_lm_dir(tmp_path / "model", False)
    rows = [{"prompt": " ".join(s.split()[:3]), "completion": " ".join(s.split()[3:])} for s in SENTENCES]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["fit", "--model", "model", "--data", "train.jsonl", "--method", "grass", "--method_options.k", "16"]
    done = run(*args, "--max_length", "3")
    assert done.returncode == 1 and "example 1: its prompt takes 3 tokens, so max_length=3 leaves none" in done.stderr
    assert run(*args, "--max_length", "16").returncode == 0
