"""Configuration loading shared by every role: one TOML file plus environment overrides.

A role defines its settings as msgspec Structs (``forbid_unknown_fields=True`` so a typo is an error).
``load_config`` reads the TOML file, lays environment variables over it and validates the result; any
problem raises ConfigError with a message that names the offending key, e.g.
``config error: Expected `int`, got `str` - at `kafka.linger_ms` (from FALCO_GITLAB_KAFKA__LINGER_MS)``.

Environment overrides: ``<PREFIX><SECTION>__<KEY>=value`` (double underscore descends one level, names
are case-insensitive). Values are parsed as JSON when they look like JSON (numbers, true/false, lists,
objects), else taken as strings, then converted to the declared type.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec

T = TypeVar("T")


class ConfigError(Exception):
    """A configuration problem, worded for the operator."""


def _env_value(text: str) -> Any:
    stripped = text.strip()
    if stripped[:1] in ("[", "{", '"') or stripped in ("true", "false", "null") or _looks_numeric(stripped):
        try:
            return msgspec.json.decode(stripped)
        except msgspec.DecodeError:
            return text
    return text


def _looks_numeric(text: str) -> bool:
    return re.fullmatch(r"-?\d+(\.\d+)?", text) is not None


def _apply_env(data: dict[str, Any], prefix: str, environ: Mapping[str, str]) -> dict[str, str]:
    """Lay environment overrides over ``data``; returns dotted key -> variable name, for messages."""
    origins: dict[str, str] = {}
    for variable, text in environ.items():
        if not variable.upper().startswith(prefix) or variable.upper() == prefix:
            continue
        path = [part.lower() for part in variable[len(prefix):].split("__") if part]
        if not path:
            continue
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = _env_value(text)
        origins[".".join(path)] = variable
    return origins


def load_config(
    schema: type[T],
    path: str | os.PathLike[str] | None,
    env_prefix: str,
    environ: Mapping[str, str] | None = None,
) -> T:
    """Load and validate ``schema`` from a TOML file (optional) and the environment."""
    data: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    origins = _apply_env(data, env_prefix.upper(), os.environ if environ is None else environ)
    try:
        return msgspec.convert(data, schema, strict=False)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = re.search(r"at `\$\.?([^`]*)`", message)
        key = match.group(1).replace("[", ".").replace("]", "") if match else ""
        message = message.replace(f"`$.{match.group(1)}`" if match else "\0", f"`{key}`")
        unknown = re.search(r"unknown field `([^`]*)`", message)
        if unknown:
            key = f"{key}.{unknown.group(1)}" if key else unknown.group(1)
        origin = origins.get(key)
        source = f"from {origin}" if origin else f"in {where}"
        raise ConfigError(f"config error ({source}): {message}") from None


def read_secret(value: str | None, file: str | None, what: str) -> str | None:
    """A secret given inline or, preferably, as a file path (trailing newline stripped)."""
    if file:
        try:
            secret = Path(file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read secret file {file}: {exc.strerror}") from None
        if not secret:
            raise ConfigError(f"{what}: secret file {file} is empty")
        return secret
    return value
