"""The ground of the config: `ConfigError` and the one-line messages of pydantic errors.

Imports no jaxllm module, so the schema (`jaxllm.config`) and every registry that checks its
own part of a config (layers, optimizers, ExMy specs) can raise the same error.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A user error in the config: the message is one line naming the field."""


def validation_message(err: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """One line for the first error of validating `model` at `prefix` (like "model.mixers.x")."""
    e = err.errors()[0]
    loc = ".".join([prefix, *map(str, e["loc"])] if prefix else map(str, e["loc"]))
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        return f"unknown key {loc!r}" + _suggest(model, [str(p) for p in e["loc"]])
    if e["type"] == "literal_error":
        return f"{loc}: {msg}"
    got = e.get("input")
    shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    return f"{loc}: {msg}{shown}" if loc else msg


def _suggest(model: type[BaseModel], parts: list[str]) -> str:
    node: Any = model
    for part in parts[:-1]:
        field = getattr(node, "model_fields", {}).get(part)
        if field is None or not isinstance(field.annotation, type):
            return ""
        node = field.annotation
    names = list(getattr(node, "model_fields", {}))
    close = difflib.get_close_matches(parts[-1], names, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; accepted: {', '.join(names)}"


def validate_options(config_cls: type[BaseModel], options: dict, where: str) -> BaseModel:
    """`options` (the section `where` of a config) as a `config_cls`, or `ConfigError`."""
    try:
        return config_cls.model_validate(options)
    except ValidationError as err:
        raise ConfigError(validation_message(err, config_cls, where)) from None


def unknown_name(where: str, kind: str, name: str, known: list[str]) -> ConfigError:
    """The error for a name no registry holds: ``model.mixer: unknown token mixer 'x'; ...``
    (`where` the field, or "" outside a config)."""
    prefix = f"{where}: " if where else ""
    return ConfigError(f"{prefix}unknown {kind} {name!r}; known: {', '.join(known)}")
