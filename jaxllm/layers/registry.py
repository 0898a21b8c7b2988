"""Token mixers and channel mixers, looked up by name.

A layer file registers itself with its own small config class:

    @register_mixer("softmax", AttentionConfig)
    class Attention(nnx.Module): ...

The model builds each layer as `cls(config_cls(**dims, **options), rngs=rngs)`, where `dims` are
the model-wide shapes (`d_model`, `n_heads`, ...) and `options` come from `model.mixers.<name>`.
`check` holds a model config to this registry before anything is built. Importing this module
imports the package `jaxllm.layers` first, which registers every layer file.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from jaxllm.errors import ConfigError, unknown_name, validate_options


@dataclass(frozen=True)
class Entry:
    name: str
    cls: type
    config_cls: type[BaseModel]


_MIXERS: dict[str, Entry] = {}
_FFNS: dict[str, Entry] = {}


def _register(table: dict[str, Entry], kind: str, name: str, config_cls: type[BaseModel]):
    def wrap(cls: type) -> type:
        if name in table and table[name].cls is not cls:
            raise ValueError(f"{kind} {name!r} is registered twice")
        table[name] = Entry(name, cls, config_cls)
        return cls

    return wrap


def register_mixer(name: str, config_cls: type[BaseModel]):
    return _register(_MIXERS, "token mixer", name, config_cls)


def register_ffn(name: str, config_cls: type[BaseModel]):
    return _register(_FFNS, "channel mixer", name, config_cls)


def _lookup(table: dict[str, Entry], kind: str, name: str, where: str = "") -> Entry:
    if name not in table:
        raise unknown_name(where, kind, name, sorted(table))
    return table[name]


def mixer(name: str) -> Entry:
    return _lookup(_MIXERS, "token mixer", name)


def ffn(name: str) -> Entry:
    return _lookup(_FFNS, "channel mixer", name)


def mixers() -> list[str]:
    return sorted(_MIXERS)


def ffns() -> list[str]:
    return sorted(_FFNS)


def check(model_cfg, expert_axis: int = 1) -> None:
    """`ConfigError` (one line naming the field) unless every token / channel mixer named by
    `model_cfg` (a `ModelConfig`) is registered, the options under `model.mixers.<name>` /
    `model.ffns.<name>` validate against its config class, and an expert axis of `expert_axis`
    devices splits the channel mixer's experts evenly."""
    where = "model.layer_pattern" if model_cfg.layer_pattern else "model.mixer"
    for name in model_cfg.layer_pattern or [model_cfg.mixer]:
        _lookup(_MIXERS, "token mixer", name, where)
    _lookup(_FFNS, "channel mixer", model_cfg.ffn, "model.ffn")
    for name, options in model_cfg.mixers.items():
        entry = _lookup(_MIXERS, "token mixer", name, "model.mixers")
        validate_options(entry.config_cls, options, f"model.mixers.{name}")
    for name, options in model_cfg.ffns.items():
        entry = _lookup(_FFNS, "channel mixer", name, "model.ffns")
        validate_options(entry.config_cls, options, f"model.ffns.{name}")
    ffn_cls = _FFNS[model_cfg.ffn].config_cls
    if expert_axis > 1 and hasattr(ffn_cls, "check_expert_axis"):
        options = ffn_cls.model_validate(model_cfg.ffns.get(model_cfg.ffn, {}))
        try:
            options.check_expert_axis(expert_axis)
        except ValueError as e:
            raise ConfigError(str(e)) from None
