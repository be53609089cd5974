"""Typed configuration sections: nested dicts become dataclasses, with one-line errors.

Each layer owns the dataclass of its own section (`data_pipeline.config`,
`parallel.config`, `pretrain.model.config`, ...); `from_dict` builds any of
them from the composed Hydra tree and refuses unknown keys and wrong types,
naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from common.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration value is wrong; the message names the key."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def from_dict(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Builds dataclass `cls` from nested dicts, refusing unknown keys and wrong types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(
                f"{prefix}{key}: unknown key; expected one of {', '.join(sorted(names))}"
            )
    kwargs = {key: _convert(hints[key], value, f"{prefix}{key}") for key, value in values.items()}
    return cls(**kwargs)


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r}: expected one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"{key}={value!r}: expected {hint.__name__}")
        return value
    return value
