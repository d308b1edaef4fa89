"""Config files in TOML or YAML, chosen per file by its extension (one command may read both), and the
settings written back as TOML (``--print_config`` after a TOML file).

jsonargparse reads every file and flag value with one mode's loader; the mode registered here picks TOML
for ``.toml`` files and YAML for everything else — YAML also reads flag values (``[fc1, fc2]``, ``null``)
the way the YAML mode does, and what jsonargparse dumps and reads back internally. The standard library
reads TOML but does not write it, hence ``dumps``.
"""

from __future__ import annotations

import json
import math
import sys

import jsonargparse
import tomllib
import yaml

MODE = "dunegrass"  # the parser mode: the loader and dumper below


_YAML = jsonargparse.get_loader("yaml")  # jsonargparse's own: reads 2024-01-01 as text, not as a date


def load(text: str, path=None):
    """A config file's (or a flag value's) contents: TOML for a ``.toml`` path, else YAML."""
    if path is not None and str(path).lower().endswith(".toml"):
        return tomllib.loads(text)
    try:
        loaded = _YAML(text)
    except yaml.YAMLError:
        if path is None:
            raise
        loaded = None
    if path is not None and not isinstance(loaded, dict):  # TOML under another extension: not a YAML mapping
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            if loaded is None:
                return _YAML(text)  # the YAML error, which names the line
    return loaded


def dumps(config: dict) -> str:
    """``config`` (scalars, lists, nested sections) as TOML; a None, which TOML cannot hold, is written as a
    comment naming the key, so the printed config still shows every field."""
    lines: list[str] = []
    _table(config, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _table(table: dict, path: list[str], lines: list[str]) -> None:
    sections = {k: v for k, v in table.items() if isinstance(v, dict)}
    if path:
        lines += ["", f"[{'.'.join(_key(p) for p in path)}]"]
    for key, value in table.items():
        if key in sections:
            continue
        lines.append(f"# {_key(key)} = (none)" if value is None else f"{_key(key)} = {_value(value)}")
    for key, value in sections.items():
        _table(value, [*path, key], lines)


def _key(key: str) -> str:
    bare = key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key)
    return key if bare else _string(key)


def _string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")  # TOML's escapes are JSON's, and DEL


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        items = (f"{_key(k)} = {_value(v)}" for k, v in value.items() if v is not None)
        return "{ " + ", ".join(items) + " }"
    raise TypeError(f"a config value of type {type(value).__name__} has no TOML form: {value!r}")


def print_toml(parser: jsonargparse.ArgumentParser, argv: list[str], flags: str = "") -> None:
    """``--print_config[=skip_null,skip_default]`` after a TOML file: the settings the run would use, as TOML,
    required fields given or not (as jsonargparse's own print does). TOML has no null: a setting set to null
    where its default is not is named on stderr, as the printed file reads back with the default there."""
    skip = {word.strip() for word in flags.split(",") if word.strip()}
    parsed = parser.parse_args(argv, _skip_validation=True)
    settings = json.loads(parser.dump(parsed, format="json", skip_validation=True, skip_unset=False))
    defaults = _flat(
        json.loads(parser.dump(parser.get_defaults(), format="json", skip_validation=True, skip_unset=False))
    )
    lost = [key for key, value in _flat(settings).items() if value is None and defaults.get(key) is not None]
    print(dumps(_pruned(settings, defaults, skip)), end="")
    if lost:
        flags = " ".join(f"--{key} null" for key in lost)
        print(f"# note: TOML cannot write null; give {flags} with this file to keep them", file=sys.stderr)


def _pruned(settings: dict, defaults: dict, skip: set[str], prefix: str = "") -> dict:
    """``settings`` without its nulls (``skip_null``) or the values equal to their defaults (``skip_default``),
    sections left empty dropped."""
    out = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            inner = _pruned(value, defaults, skip, f"{name}.")
            if inner or "skip_default" not in skip:
                out[key] = inner
        elif not (value is None and "skip_null" in skip) and not (
            "skip_default" in skip and name in defaults and defaults[name] == value
        ):
            out[key] = value
    return out


def _flat(settings: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _yaml(data) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)


jsonargparse.set_loader(MODE, load, exceptions=(tomllib.TOMLDecodeError, yaml.YAMLError))
jsonargparse.set_dumper(MODE, _yaml)  # jsonargparse dumps parts of a config and reads them back with ``load``
