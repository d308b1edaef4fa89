"""``dunegrass fit CONFIG``, ``dunegrass score CONFIG --queries PATH`` and ``dunegrass inspect CACHE_DIR``.

``fit`` builds the attributor the config names and fits it into ``cache_dir/name`` (resumable) and records
its settings in ``run.json``; ``score`` builds the same one — from the same config, or with ``--run
CACHE_DIR/NAME`` from that record, flags overriding it —, finds the run's features or members (fitting
whatever is missing) and writes, per
query, the top proponents and opponents with their texts (``top.csv``, ``top.jsonl``), the scores
(``top.npz``; ``scores.npz`` with ``--dense``) and ``report.html``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import sys
import time
import typing

import jsonargparse

from .. import methods as m
from ..errors import ConfigMismatchError, DunegrassError
from ..notices import notice_once
from ..options import DEFAULT_RECIPE, LORA_RECIPE
from ..scores import TopScores
from ..store.atomic import atomic_write_bytes, atomic_write_json
from . import config_files
from .config import FitConfig, MethodOptions, ScoreConfig
from .loaders import Examples, Loaded, load_data, load_model, load_pairs


def parser(kind: type[FitConfig], prog: str) -> jsonargparse.ArgumentParser:
    """The command's parser, built from its dataclass: ``--config FILE`` then any field as a flag; each file
    read by its extension, flag values as YAML (``config_files``)."""
    description = (kind.__doc__ or "").split("\n\n")[0]
    p = jsonargparse.ArgumentParser(prog=prog, description=description, parser_mode=config_files.MODE)
    p.add_argument("--config", action=jsonargparse.ActionConfigFile, help="a YAML or TOML file of the fields below")
    p.add_class_arguments(kind, None)
    return p


def parse(kind: type[FitConfig], argv: list[str], prog: str) -> FitConfig:
    """``kind`` from a YAML or TOML config file (by its extension) and flags; for ``score``, ``--run DIR``
    takes the settings a fit recorded in ``DIR/run.json`` as the defaults that the file and flags override."""
    if argv and not argv[0].startswith("-"):  # dunegrass fit CONFIG [--flags]
        argv = ["--config", argv[0], *argv[1:]]
    argv = _config_files_first(argv)  # flags override the files wherever they stand (jsonargparse: last wins)
    configs = [v for f, v in zip(argv, argv[1:]) if f == "--config"]
    configs += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for path in configs:
        if not os.path.isfile(path):  # else jsonargparse reads the name as TOML text
            raise DunegrassError(f"the config file {path} does not exist (from {os.getcwd()})")
    argv = _lora_switches(_bare_flags(argv, boolean_flags(kind)), ("--daunce.lora", "--bif.lora"))
    run, argv = _pop_option(argv, "--run") if kind is ScoreConfig else (None, argv)
    printing = [a for a in argv if a.split("=", 1)[0] == "--print_config"]
    # after a TOML file, the settings are printed as TOML (jsonargparse would need the toml package)
    print_toml = printing and any(c.lower().endswith(".toml") for c in configs)
    argv = [a for a in argv if a not in printing] if print_toml else argv
    p = parser(kind, prog)
    if kind is ScoreConfig:
        p.add_argument("--run", help="CACHE_DIR/NAME: score that fitted run with the settings its fit recorded")
    if run is not None:
        recorded, known = recorded_settings(run), set(p.get_defaults().keys())
        unknown = sorted(set(recorded) - known)
        if unknown:  # a run fitted by another version: its other settings still apply
            notice_once(f"run-{run}", f"{run}/run.json records settings this version does not know, ignored: {unknown}")
        p.set_defaults({k: v for k, v in recorded.items() if k in known})
    _partial_recipe_from_daunces(p, argv)
    if print_toml:
        config_files.print_toml(p, argv, ",".join(a.partition("=")[2] for a in printing))
        raise SystemExit(0)
    ns = p.instantiate(p.parse_args(argv))
    if ns.get("run") is not None:  # --run was taken from argv above, so this came from a config file
        raise DunegrassError("--run is read from the command line only, not from a config file")
    return kind(**{f.name: ns[f.name] for f in dataclasses.fields(kind)})


def _config_files_first(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config FILE`` (and ``--config=FILE``) moved to the front, in their order."""
    files, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == "--config" and i + 1 < len(argv):
            files += argv[i : i + 2]
            i += 2
            continue
        (files if argv[i].startswith("--config=") else rest).append(argv[i])
        i += 1
    return files + rest


def _partial_recipe_from_daunces(p: jsonargparse.ArgumentParser, argv: list[str]) -> None:
    """``--daunce.train.lr 0.01`` (or a ``[daunce.train]`` table naming some fields) changes those fields of
    the recipe Daunce would use — with LoRA, AdamW for one epoch — not of TrainConfig's own defaults (Adam, 20
    epochs), which replaced the whole recipe silently."""
    if p.get_defaults().get("daunce.train") is not None:  # a recorded run's recipe is the base already
        return
    first = p.parse_args([a for a in argv if not a.startswith("--print_config")], _skip_validation=True)
    if first.get("daunce.train") is not None:
        recipe = LORA_RECIPE if first.get("daunce.lora") else DEFAULT_RECIPE
        p.set_defaults({"daunce.train": recipe.to_dict()})


def _pop_option(argv: list[str], flag: str) -> tuple[str | None, list[str]]:
    """``flag``'s value (``--flag VALUE`` or ``--flag=VALUE``) and ``argv`` without it."""
    value, rest, i = None, [], 0
    while i < len(argv):
        if argv[i] == flag:
            if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                raise DunegrassError(f"{flag} needs a value, e.g. {flag} runs/NAME")
            value, i = argv[i + 1], i + 2
            continue
        if argv[i].startswith(flag + "="):
            value = argv[i].split("=", 1)[1]
        else:
            rest.append(argv[i])
        i += 1
    return value, rest


def recorded_settings(run: str) -> dict:
    """The settings ``dunegrass fit`` recorded in ``run/run.json``, as parser defaults (dotted keys): the run's
    own directory as ``cache_dir``/``name`` (wherever it now is), and paths relative to the directory the fit
    ran in resolved against it when they exist there."""
    path = os.path.join(run, "run.json")
    if not os.path.isfile(path):
        raise DunegrassError(
            f"{run} has no run.json: --run takes the directory a `dunegrass fit` wrote (CACHE_DIR/NAME)"
        )
    with open(path) as f:
        record = json.load(f)
    config, cwd = dict(record["config"]), record.get("cwd")
    config.pop("yes", None)  # consent to a paid service's charges is given per command, never carried over
    if cwd:
        for key in ("model", "data", "weights"):
            value = config.get(key)
            if value and not os.path.isabs(value) and os.path.exists(os.path.join(cwd, value)):
                config[key] = os.path.join(cwd, value)
    root = os.path.abspath(run)
    config["cache_dir"], config["name"] = os.path.dirname(root), os.path.basename(root)
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):  # a section (influence, daunce, ...): its fields are the parser's keys
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _lora_switches(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """``--daunce.lora`` alone or ``true`` means LoRA with the default adapters, ``false`` none (``null``); a
    mapping or ``--daunce.lora.rank 8`` pass through."""
    on = lambda flag: [flag, "true"]  # noqa: E731 (the options turn True into the default LoraConfig)
    out, i = [], 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        following = argv[i + 1].lower() if i + 1 < len(argv) else ""
        if flag in flags and eq and value.lower() in ("true", "false"):  # --daunce.lora=true
            out += on(flag) if value.lower() == "true" else [flag, "null"]
        elif argv[i] in flags and following in ("true", "false"):
            out += on(flag) if following == "true" else [flag, "null"]
            i += 1
        elif argv[i] in flags and (not following or following.startswith("--")):
            out += on(flag)
        else:
            out.append(argv[i])
        i += 1
    return out


def boolean_flags(kind: type) -> tuple[str, ...]:
    """The flags of ``kind``'s boolean fields, its sections' included (``--dense``, ``--daunce.normalize``)."""
    flags, hints = [], typing.get_type_hints(kind)
    for f in dataclasses.fields(kind):
        hint = hints[f.name]
        if hint is bool:
            flags.append(f"--{f.name}")
        elif dataclasses.is_dataclass(hint):
            flags += [flag.replace("--", f"--{f.name}.", 1) for flag in boolean_flags(hint)]
    return tuple(flags)


def _bare_flags(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """``--dense`` alone means ``--dense true`` (jsonargparse wants a value for every boolean)."""
    out = []
    for i, a in enumerate(argv):
        out.append(a)
        following = argv[i + 1] if i + 1 < len(argv) else ""
        if a in flags and following.lower() not in ("true", "false"):
            out.append("true")
    return out


# the method_options each method reads (build below); a setting given for another method is named, not dropped
METHOD_OPTIONS = {
    "grass": ("k", "mask", "mask_size", "params"),
    "factgrass": ("k", "mask", "mask_size", "modules"),
    "logra": ("k_in", "k_out", "modules"),
    "trak": ("k", "params"),
    "tracin": ("compressor", "params"),
    "gradient": ("compressor", "params"),
    "exact": ("l2", "hessian_damping", "hessian", "params"),
}


def say_ignored_options(cfg: FitConfig) -> None:
    """A notice naming the method_options set away from their defaults that ``cfg.method`` does not read."""
    default = MethodOptions()
    used = METHOD_OPTIONS.get(cfg.method, ())
    ignored = [
        f.name
        for f in dataclasses.fields(MethodOptions)
        if f.name not in used and getattr(cfg.method_options, f.name) != getattr(default, f.name)
    ]
    if ignored:
        notice_once(
            f"ignored-options:{cfg.method}:{ignored}",
            f"method_options {', '.join(ignored)} do not apply to --method {cfg.method} and are ignored "
            f"({cfg.method} reads {', '.join(used) or 'none of them'})",
        )


def build(cfg: FitConfig, loaded: Loaded) -> m.Attributor:
    """The attributor ``cfg.method`` names, with the config's settings."""
    model, task, o = loaded.model, loaded.task, cfg.method_options
    params = o.params or None
    modules = o.modules or None
    influence = {"options": cfg.influence}
    if cfg.method == "daunce":
        return m.Daunce(model, task, options=cfg.daunce)
    if cfg.method == "bif":
        return m.BayesianInfluence(model, task, options=cfg.bif)
    if cfg.method == "grass":
        return m.GraSS(model, task, k=o.k, mask=o.mask, mask_size=o.mask_size, params=params, **influence)
    if cfg.method == "factgrass":
        sizes = {"k": o.k or 4096, "mask": o.mask, "mask_size": o.mask_size or 128}
        return m.FactGraSS(model, task, modules=modules, **sizes, **influence)
    if cfg.method == "logra":
        return m.LoGra(model, task, k_in=o.k_in, k_out=o.k_out, modules=modules, **influence)
    if cfg.method == "trak":
        return m.TRAK(model, task, k=o.k, params=params, **influence)
    if cfg.method == "tracin":
        return m.TracIn(model, task, compressor=o.compressor, params=params, **influence)
    if cfg.method == "gradient":
        return m.GradientInfluence(model, task, compressor=o.compressor, params=params, **influence)
    return m.ExactInfluence(
        model, task, l2=o.l2, damping=o.hessian_damping, hessian=o.hessian, params=params, **influence
    )


def prepare(cfg: FitConfig, *paths: str) -> tuple[m.Attributor, Loaded | None, list[Examples]]:
    """The attributor, the loaded model (None through a service) and the examples at ``paths``."""
    say_ignored_options(cfg)
    if cfg.method == "daunce-api":
        return build_api(cfg), None, [load_pairs(p) for p in paths]
    loaded = load_model(cfg.model, cfg.weights, cfg.task, cfg.device)
    return build(cfg, loaded), loaded, [load_data(p, loaded, cfg.max_length) for p in paths]


def build_api(cfg: FitConfig) -> m.BlackBoxDaunce:
    """Black-box Daunce on ``cfg.model`` at the service ``cfg.api`` names."""
    api = cfg.api
    backend = m.OpenAICompatibleBackend(
        cfg.model,
        api.base_url,
        protocol=api.protocol,
        api_key_env=api.api_key_env,
        hyperparameters=None if api.n_epochs is None else {"n_epochs": api.n_epochs},
        max_answer_tokens=api.max_answer_tokens,
        poll_seconds=api.poll_seconds,
    )
    o = cfg.daunce
    return m.BlackBoxDaunce(
        backend,
        num_models=o.num_models,
        subsample_ratio=o.subsample_ratio,
        seed=o.seed,
        normalize=o.normalize,
        confirm=cfg.yes,
    )


def run_dir(cfg: FitConfig) -> str:
    return os.path.join(cfg.cache_dir, cfg.name)


def fit(cfg: FitConfig) -> tuple[m.Attributor, Loaded, Examples]:
    """Fit ``cfg``'s attributor into its run directory (resuming what is there), and record the config."""
    start = time.perf_counter()
    attr, loaded, (train,) = prepare(cfg, cfg.data)
    attr.fit(train.data, cache_dir=run_dir(cfg))
    record_fit(cfg)
    print(
        f"dunegrass fit: {attr.method_name} on {len(train.data)} training examples in "
        f"{time.perf_counter() - start:.1f} s; kept in {run_dir(cfg)}"
    )
    return attr, loaded, train


def record_fit(cfg: FitConfig) -> None:
    """``run.json``: the fit's settings (a score's own fields left out), for ``score --run`` from anywhere."""
    fields = {f.name for f in dataclasses.fields(FitConfig)}
    config = {k: v for k, v in cfg.to_dict().items() if k in fields}
    record = {"command": "fit", "config": config, "cwd": os.getcwd()}  # cwd: resolves relative paths elsewhere
    atomic_write_json(os.path.join(run_dir(cfg), "run.json"), record)


def score(cfg: ScoreConfig) -> TopScores:
    """Score ``cfg.queries`` with the run's attributor and write the results; returns the top-k scores."""
    start = time.perf_counter()
    recorded = os.path.join(run_dir(cfg), "run.json")
    fitted_here = not os.path.isfile(recorded)  # then the fit below is this run's: record it as `fit` does
    fit_record = {}
    if not fitted_here:
        with open(recorded) as f:
            fit_record = json.load(f)
        fitted = fit_record["config"].get("method")
        if fitted != cfg.method:
            raise DunegrassError(
                f"{run_dir(cfg)} is a {fitted} run; --method {cfg.method} needs its own fit (dunegrass fit ... "
                f"--method {cfg.method} --name ANOTHER_NAME)"
            )
    attr, _, (train, queries) = prepare(cfg, cfg.data, cfg.queries)
    try:
        attr.fit(train.data, queries=queries.data, cache_dir=run_dir(cfg))  # the run's cache: nothing to redo
    except ConfigMismatchError as e:
        changed = changed_settings(fit_record, cfg)
        raise ConfigMismatchError(
            f"{e}. {f'Changed since the fit (run.json): {changed}. ' if changed else ''}To score with settings "
            "that change what was fitted, fit them as a new run (dunegrass fit ... --name ANOTHER_NAME)"
        ) from e
    if fitted_here:
        record_fit(cfg)
    elif _grew(fit_record, cfg):  # the record follows what the cache now holds, this score's other settings not
        atomic_write_json(recorded, fit_record)
    out = cfg.out or run_dir(cfg)
    os.makedirs(out, exist_ok=True)
    if cfg.dense:
        dense = attr.score(queries.data)
        dense.save(os.path.join(out, "scores.npz"))
        top = TopScores.from_scores(dense, cfg.top_k)
    else:
        top = attr.score(queries.data, top_k=cfg.top_k)
    top.save(os.path.join(out, "top.npz"))
    rows = ranked_rows(top, train.texts, queries.texts)
    write_rows(out, rows)
    from ..report import write_run_report

    write_run_report(os.path.join(out, "report.html"), cfg.to_dict(), top, train.texts, queries.texts)
    print(
        f"dunegrass score: {len(queries.data)} queries against {len(train.data)} training examples with "
        f"{attr.method_name} in {time.perf_counter() - start:.1f} s; wrote {out}/top.csv, top.jsonl, top.npz"
        f"{', scores.npz' if cfg.dense else ''} and report.html"
    )
    return top


def _grew(fit_record: dict, cfg: FitConfig) -> bool:
    """Whether this score trained members (Daunce) or chains (BIF) the run did not hold; if so, says so and
    puts the new count in ``fit_record``."""
    section, field = {"daunce": ("daunce", "num_models"), "bif": ("bif", "chains")}.get(cfg.method, (None, None))
    if section is None:
        return False
    recorded = fit_record["config"].get(section, {})
    before, now = recorded.get(field), getattr(getattr(cfg, section), field)
    if not isinstance(before, int) or now <= before:
        return False
    recorded[field] = now
    print(f"dunegrass score: trained {now - before} more {'members' if section == 'daunce' else 'chains'} "
          f"({before} → {now}); {run_dir(cfg)}/run.json records the run as it now is")  # fmt: skip
    return True


def changed_settings(fit_record: dict, cfg: FitConfig) -> str:
    """The flags whose values differ from those the fit recorded (``run.json``), as ``--flag NOW (fitted:
    THEN)``: a cache's refusal names its own internal keys, this names what the user typed. Paths naming the
    same file (relative to where the fit ran) are the same setting; a setting only one side knows (another
    version's) is not counted."""
    fitted, cwd = fit_record.get("config", {}), fit_record.get("cwd") or os.getcwd()
    now = cfg.to_dict()
    for key in ("yes", "cache_dir", "name", "device"):  # not part of what was fitted
        now.pop(key, None)
    for key in ("model", "data", "weights"):
        old, new = fitted.get(key), now.get(key)
        if isinstance(old, str) and isinstance(new, str):
            if os.path.realpath(os.path.join(cwd, old)) == os.path.realpath(new):
                now.pop(key)
    changes = [f"--{flag} {json.dumps(b)} (fitted: {json.dumps(a)})" for flag, a, b in _differences(fitted, now)]
    return ", ".join(changes)


def _differences(old: dict, new: dict, prefix: str = ""):
    """(dotted key, old, new) for each value the two settings both hold and hold differently."""
    for key in sorted(set(old) & set(new)):
        a, b = old[key], new[key]
        if isinstance(a, dict) and isinstance(b, dict):
            yield from _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            yield f"{prefix}{key}", a, b


def ranked_rows(top: TopScores, train_texts: list[str] | None, query_texts: list[str] | None) -> list[dict]:
    """One row per (query, list, rank): the training example, its text and its score (and standard error).

    ``list`` is the ranking the row comes from (``top``: highest scores first, ``bottom``: lowest first);
    ``kind`` is what the score says: ``proponent`` (> 0), ``opponent`` (< 0), ``neither`` (0) or ``nan`` — the
    bottom of a small training set, or of a query most examples help, can hold positive scores.
    """
    rows = []
    for ranking, (idx, vals), errs in (("top", top.top(), top.top_stderr), ("bottom", top.bottom(), top.bottom_stderr)):
        for q in range(idx.shape[0]):
            for r in range(idx.shape[1]):
                i, score = int(idx[q, r]), float(vals[q, r])
                rows.append(
                    {
                        "query": q,
                        "query_text": None if query_texts is None else query_texts[q],
                        "list": ranking,
                        "kind": _kind(score),
                        "rank": r + 1,
                        "train_index": i,
                        "train_text": None if train_texts is None else train_texts[i],
                        "score": score,
                        "stderr": None if errs is None else float(errs[q, r]),
                    }
                )
    return rows


def _kind(score: float) -> str:
    """What a score says about its training example (a diverged NaN score says nothing, and is named)."""
    if math.isnan(score):
        return "nan"
    return "proponent" if score > 0 else "opponent" if score < 0 else "neither"


def write_rows(out: str, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(os.path.join(out, "top.csv"), buf.getvalue().encode())
    atomic_write_bytes(os.path.join(out, "top.jsonl"), "".join(json.dumps(r) + "\n" for r in rows).encode())


def main(command: str, argv: list[str]) -> int:
    try:
        if command == "fit":
            fit(parse(FitConfig, argv, "dunegrass fit"))
        else:
            score(parse(ScoreConfig, argv, "dunegrass score"))
    except DunegrassError as e:
        print(f"dunegrass {command}: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # the service's own errors (unreachable, refused), after the client's retries
        if not type(e).__module__.startswith("openai"):
            raise
        print(f"dunegrass {command}: the fine-tuning service failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0
