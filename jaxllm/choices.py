"""Every choice a config makes by name, held to the registry that owns it.

The schema (`jaxllm.config`) types a name as a plain string; each registry checks its own
names and their options: token and channel mixers (`jaxllm.layers.registry`, with the expert
axis), optimizers (`jaxllm.optim.registry`) and ExMy specs (`jaxllm.precision.exmy`). `check`
runs them all on a loaded config, so the CLIs stop with one line naming the field before
anything is built; `models.build` and `build_optimizer` run their own part again.
"""

from __future__ import annotations

from jaxllm.config import Config
from jaxllm.layers import registry as layers
from jaxllm.optim import registry as optimizers
from jaxllm.precision.exmy import check_specs


def check(cfg: Config) -> None:
    """`ConfigError` (one line naming the field and what is accepted) on the first name or
    option of `cfg` that its registry does not hold."""
    layers.check(cfg.model, expert_axis=cfg.parallel.mesh.expert)
    optimizers.check(cfg.optim)
    check_specs(cfg.precision.quantize)


def known() -> list[str]:
    """The registered names and where their options go, for `--help`."""
    return [
        f"Token mixers (model.mixer, model.layer_pattern): {', '.join(layers.mixers())}",
        f"Channel mixers (model.ffn): {', '.join(layers.ffns())}",
        "Mixer options: model.mixers.<name>.<option>=value",
        f"Optimizers (optim.name): {', '.join(optimizers.optimizers())}",
        "Optimizer options: optim.optimizers.<name>.<option>=value",
    ]
