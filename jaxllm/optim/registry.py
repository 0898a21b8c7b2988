"""Optimizers, looked up by name (`optim.name`).

An optimizer file registers a builder with its own small options class and its defaults:

    @register_optimizer("came", CameOptions, lr=2e-4, b2=0.999, weight_decay=0.1)
    def _came(learning_rate, options, *, b1, b2, weight_decay, mask): ...

`optim.lr`, `optim.b2` and `optim.weight_decay` left at None take those defaults (`resolved`);
the options come from `optim.optimizers.<name>`, as a mixer's come from `model.mixers.<name>`.
`check` holds an optim config to this registry. Importing this module imports the package
`jaxllm.optim` first, which registers every optimizer file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optax
from pydantic import BaseModel, ConfigDict

from jaxllm.errors import unknown_name, validate_options
from jaxllm.optim.decay import decay_mask


class OptimizerOptions(BaseModel):
    """The options of one optimizer (`optim.optimizers.<name>`); none for most."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Entry:
    name: str
    build: Callable[..., optax.GradientTransformation]
    options_cls: type[OptimizerOptions]
    defaults: dict[str, float | None]  # lr, b2, weight_decay


_OPTIMIZERS: dict[str, Entry] = {}


def register_optimizer(
    name: str,
    options_cls: type[OptimizerOptions],
    *,
    lr: float,
    b2: float | None,
    weight_decay: float,
):
    """Register `build(learning_rate, options, *, b1, b2, weight_decay, mask)` as `name`."""

    def wrap(build: Callable) -> Callable:
        if name in _OPTIMIZERS and _OPTIMIZERS[name].build is not build:
            raise ValueError(f"optimizer {name!r} is registered twice")
        defaults = {"lr": lr, "b2": b2, "weight_decay": weight_decay}
        _OPTIMIZERS[name] = Entry(name, build, options_cls, defaults)
        return build

    return wrap


def optimizer(name: str, where: str = "") -> Entry:
    if name not in _OPTIMIZERS:
        raise unknown_name(where, "optimizer", name, optimizers())
    return _OPTIMIZERS[name]


def optimizers() -> list[str]:
    return sorted(_OPTIMIZERS)


def check(optim_cfg) -> None:
    """`ConfigError` (one line naming the field) unless `optim_cfg.name` is registered and every
    `optim.optimizers.<name>` names one and validates against its options class."""
    optimizer(optim_cfg.name, "optim.name")
    for name, options in optim_cfg.optimizers.items():
        entry = optimizer(name, "optim.optimizers")
        validate_options(entry.options_cls, options, f"optim.optimizers.{name}")


def resolved(optim_cfg) -> dict[str, Any]:
    """`lr`, `b2`, `weight_decay` of `optim_cfg` with None replaced by the optimizer's default."""
    table = optimizer(optim_cfg.name, "optim.name").defaults
    return {k: table[k] if getattr(optim_cfg, k) is None else getattr(optim_cfg, k) for k in table}


def make_optimizer(
    optim_cfg,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float | None = None,
    mask: Any = decay_mask,
) -> optax.GradientTransformation:
    """The bare optimizer `optim_cfg.name` (no clipping), at `learning_rate`; `weight_decay`
    None takes the resolved config value."""
    entry = optimizer(optim_cfg.name, "optim.name")
    options = entry.options_cls.model_validate(optim_cfg.optimizers.get(entry.name, {}))
    r = resolved(optim_cfg)
    wd = r["weight_decay"] if weight_decay is None else weight_decay
    return entry.build(
        learning_rate, options, b1=optim_cfg.b1, b2=r["b2"], weight_decay=wd, mask=mask
    )
