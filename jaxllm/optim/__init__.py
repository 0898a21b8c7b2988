"""optax transforms, the optimizers registered by name, and the factory that builds a chain from
the config. A new optimizer is one file that registers itself plus its line below."""

# Importing an optimizer file registers it (CAME's with its names below).
from jaxllm.optim import adamw, sgd, sign  # noqa: F401
from jaxllm.optim.came import CameOptions, CameState, came, scale_by_came
from jaxllm.optim.decay import decay_mask, with_decoupled_decay
from jaxllm.optim.factory import build_optimizer
from jaxllm.optim.groups import group_labels, grouped_optimizer, lr_scale_for_tokens
from jaxllm.optim.registry import (
    OptimizerOptions,
    make_optimizer,
    optimizer,
    optimizers,
    register_optimizer,
    resolved,
)
from jaxllm.optim.schedules import warmup_schedule

__all__ = [
    "CameOptions",
    "CameState",
    "OptimizerOptions",
    "build_optimizer",
    "came",
    "decay_mask",
    "group_labels",
    "grouped_optimizer",
    "lr_scale_for_tokens",
    "make_optimizer",
    "optimizer",
    "optimizers",
    "register_optimizer",
    "resolved",
    "scale_by_came",
    "warmup_schedule",
    "with_decoupled_decay",
]
