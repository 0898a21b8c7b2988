"""Token mixers and channel mixers, looked up by name.

A layer file registers itself with its own small config class:

    @register_mixer("softmax", AttentionConfig)
    class Attention(nnx.Module): ...

The model builds each layer as `cls(config_cls(**dims, **options), rngs=rngs)`, where `dims` are
the model-wide shapes (`d_model`, `n_heads`, ...) and `options` come from `model.mixers.<name>`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel


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


def _lookup(table: dict[str, Entry], kind: str, name: str) -> Entry:
    _load_builtin()
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(sorted(table))}")
    return table[name]


def mixer(name: str) -> Entry:
    return _lookup(_MIXERS, "token mixer", name)


def ffn(name: str) -> Entry:
    return _lookup(_FFNS, "channel mixer", name)


def mixers() -> list[str]:
    _load_builtin()
    return sorted(_MIXERS)


def ffns() -> list[str]:
    _load_builtin()
    return sorted(_FFNS)


def _load_builtin() -> None:
    # Importing the layer package runs every layer file's registration.
    import jaxllm.layers  # noqa: F401
