"""Reading configs: files (YAML/JSON/TOML), the built-in default, and dotted overrides."""
from __future__ import annotations

import importlib.resources
import json
import os

import yaml
from pydantic import BaseModel, ValidationError

try:  # Python 3.11+
    import tomllib as _toml
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 without tomllib
    try:
        import tomli as _toml  # type: ignore[no-redef]
    except ModuleNotFoundError:
        _toml = None

from .errors import ConfigError
from .explain import _explain
from .schema import Config, _accepts_text_only, _field_info, _is_section, _unknown_key_message
from .yamlio import _yaml_load, parse_value


# --------------------------------------------------------------------------------------
# Reading files and overrides
# --------------------------------------------------------------------------------------

_DEFAULT_SOURCE = "built-in default config"


def _read_default_text() -> str:
    return importlib.resources.files("gigatrain").joinpath("configs").joinpath("default.yaml").read_text("utf-8")


def _read_file(path: str) -> dict:
    """Load a YAML, JSON or TOML file (chosen by extension) into a dict."""
    if os.path.isdir(path):
        raise ConfigError(f"{path} is a folder, not a config file: give a .yaml, .json or .toml file "
                          "(put key=value overrides after it)", source=path)
    if not os.path.isfile(path):
        raise ConfigError(f"the config file {path} does not exist: check the path", source=path)
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext in (".yaml", ".yml"):
            with open(path, encoding="utf-8") as f:
                data = _yaml_load(f.read())
        elif ext == ".json":
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        elif ext == ".toml":
            if _toml is None:  # pragma: no cover
                raise ConfigError("reading TOML needs Python 3.11+ or the tomli package: install tomli or use YAML",
                                  source=path)
            with open(path, "rb") as f:
                data = _toml.load(f)
        else:
            raise ConfigError(f"cannot tell the format of {path} from its extension {ext or '(none)'}: "
                              "name it .yaml, .yml, .json or .toml", source=path)
    except (yaml.YAMLError, json.JSONDecodeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"the file is not valid {ext.lstrip('.').upper()}: {exc}; fix the syntax", source=path) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"the file must hold a mapping of keys (model:, train:, ...) but holds a "
                          f"{type(data).__name__}", source=path)
    return data


def _apply_override(data: dict, item: str) -> None:
    """Apply one `a.b=value` override to the raw nested dict, checking the key against the
    schema first so a typo is reported with suggestions."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value, e.g. train.lr=3e-4")
    key, text = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"override {item!r} has an empty key: write it as section.key=value, e.g. train.lr=3e-4")
    cls: type[BaseModel] = Config
    for i, part in enumerate(parts):
        info = _field_info(cls, part)
        if info is None:
            raise ConfigError(_unknown_key_message(parts[:i], part))
        last = i == len(parts) - 1
        if _is_section(info.annotation):
            cls = info.annotation
            if last:  # a whole section as a flow mapping, merged: `train={steps: 5, lr: 0.01}`
                value = parse_value(text)
                if isinstance(value, dict) and isinstance(data.get(part), dict):
                    data[part].update(value)
                else:
                    data[part] = value
                return
            node = data.get(part)
            if not isinstance(node, dict):
                node = data[part] = {}
            data = node
        elif not last:
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is a value, not a section, so it has no "
                              f"key {parts[i + 1]}; write {'.'.join(parts[:i + 1])}=value")
        else:
            value = parse_value(text)
            if value is not None and not isinstance(value, (str, list, dict)) and _accepts_text_only(info.annotation):
                value = text
            data[part] = value


def config_from_dict(data: dict, source: str | None = None) -> Config:
    """Validate a nested dict into a Config, turning every pydantic error into one ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of keys, not a {type(data).__name__}", source=source)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, data), source=source) from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a config and apply dotted overrides.

    `path` is a .yaml/.yml, .json or .toml file, or None for the built-in default job
    (gigatrain/configs/default.yaml). Each override is `dotted.key=value`, the value parsed as
    YAML (`train.lr=3e-4`, `parallel.pp_balance=[2,2]`, `resume=auto`, `train.grad_clip=null`);
    an override sets a key whether or not the file mentions it. Raises ConfigError (one
    paragraph) for unknown keys (with the valid keys and a suggestion), wrong types (key, value
    given, expected type), values out of range and inconsistent combinations.
    """
    if path is None:
        source = _DEFAULT_SOURCE
        data = _yaml_load(_read_default_text()) or {}
    else:
        source = os.fspath(path)
        data = _read_file(source)
    if overrides:
        source += " with overrides"
    problems: list[str] = []
    for item in overrides:
        try:
            _apply_override(data, item)
        except ConfigError as exc:  # keep going so that every problem is reported at once
            problems += exc.problems
    try:
        cfg = config_from_dict(data, source)
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        raise ConfigError(problems, source=source)
    return cfg


# --------------------------------------------------------------------------------------
