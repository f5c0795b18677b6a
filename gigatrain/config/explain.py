"""Explanations: pydantic errors turned into sentences, and the generated key reference."""
from __future__ import annotations

import difflib
import json
import types
import typing
from typing import Any, Literal, Union

from pydantic import ValidationError

from .errors import _Problems
from .schema import Config, _is_section, _union_args, _unknown_key_message, config_keys


# Turning pydantic errors into sentences
# --------------------------------------------------------------------------------------

_CONSTRAINTS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of",
                "too_short", "too_long", "finite_number"}


def _fmt(value: Any) -> str:
    """A value as a user would type it (YAML flavoured), shortened."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = repr(value)
    elif isinstance(value, tuple):
        text = repr(list(value))
    else:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _describe(annotation: Any) -> str:
    """An annotation in words, for error messages: "an integer or null"."""
    if annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if origin is Literal:
        values = [_fmt(v) for v in typing.get_args(annotation)]
        return "one of " + ", ".join(values)
    if origin is list:
        (inner,) = typing.get_args(annotation)
        return f"a list of {_plural(inner)}"
    if origin is tuple:
        args = typing.get_args(annotation)
        return f"a list of {len(args)} {_plural(args[0])}"
    if _is_section(annotation):
        return "a mapping of keys"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(annotation, str(annotation))


def _plural(annotation: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings"}.get(annotation, _describe(annotation))


def _literals(annotation: Any) -> list[str]:
    if typing.get_origin(annotation) is Literal:
        return [v for v in typing.get_args(annotation) if isinstance(v, str)]
    return [v for a in _union_args(annotation) if a is not annotation for v in _literals(a)]


def _locate(loc: tuple) -> tuple[list[str], Any, bool]:
    """Split a pydantic error location into (schema key path, its annotation, unknown?).
    The rest of the location (union branch tags, list indices) is dropped: messages talk
    about the whole key."""
    cls: Any = Config
    path: list[str] = []
    for item in loc:
        if not (isinstance(item, str) and _is_section(cls)):
            break
        info = cls.model_fields.get(item)
        if info is None:
            return path + [item], None, True
        path.append(item)
        cls = info.annotation
    return path, cls, False


def _raw_value(data: Any, path: list[str]) -> Any:
    for part in path:
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _explain(exc: ValidationError, data: dict) -> list[str]:
    """One sentence per problem in a pydantic ValidationError (union branches of one key are
    merged into one sentence)."""
    problems: list[str] = []
    grouped: dict[tuple, list[dict]] = {}
    for err in exc.errors(include_url=False):
        path, annotation, unknown = _locate(err["loc"])
        if unknown:
            problems.append(_unknown_key_message(path[:-1], path[-1]))
            continue
        if err["type"] in ("value_error", "assertion_error"):
            original = (err.get("ctx") or {}).get("error")
            if isinstance(original, _Problems):
                problems += original.problems
            else:
                problems.append(str(original) if original is not None else err["msg"])
            continue
        grouped.setdefault(tuple(path), []).append(dict(err, annotation=annotation))

    for path, errs in grouped.items():
        key = ".".join(path) or "the config"
        annotation = errs[0]["annotation"]
        value = _raw_value(data, list(path))
        if len(errs) == 1 and errs[0]["type"] in _CONSTRAINTS:
            must = errs[0]["msg"].replace("Input should be", "must be")
            problems.append(f"{key}={_fmt(value)} is out of range: it {must}")
            continue
        if _is_section(annotation):
            keys = ", ".join(annotation.model_fields)
            problems.append(f"{key} must be a mapping of keys ({keys}) but is {_fmt(value)}.")
            continue
        sentence = f"{key}={_fmt(value)} is not valid: expected {_describe(annotation)}"
        options = _literals(annotation)
        if options and isinstance(value, str):
            close = difflib.get_close_matches(value, options, n=1, cutoff=0.5)
            if close:
                sentence += f". Did you mean {close[0]!r}?"
        elif isinstance(value, str) and any(a in (int, float) for a in _union_args(annotation)):
            sentence += " (write numbers without quotes)"
        problems.append(sentence)
    return problems


# --------------------------------------------------------------------------------------
# Reference documentation
# --------------------------------------------------------------------------------------

def _type_name(annotation: Any) -> str:
    """A short type for the reference table: `int | null`, `"a" | "b"`, `list[int]`."""
    if annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is Literal:
        return " | ".join(json.dumps(v) for v in typing.get_args(annotation))
    if origin is list:
        return f"list[{_type_name(typing.get_args(annotation)[0])}]"
    if origin is tuple:
        return "[" + ", ".join(_type_name(a) for a in typing.get_args(annotation)) + "]"
    return getattr(annotation, "__name__", str(annotation))


def config_reference() -> str:
    """Markdown table of every config key (dotted), its type, default and description,
    generated from the schema."""
    lines = ["| Key | Type | Default | Description |", "|---|---|---|---|"]

    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    for key in config_keys():
        section, _, name = key.rpartition(".")
        cls = Config.model_fields[section].annotation if section else Config
        info = cls.model_fields[name]
        default = info.get_default(call_default_factory=True)
        shown = json.dumps(list(default) if isinstance(default, tuple) else default)
        lines.append(f"| `{key}` | `{esc(_type_name(info.annotation))}` | `{esc(shown)}` | "
                     f"{esc(info.description or '')} |")
    return "\n".join(lines) + "\n"
