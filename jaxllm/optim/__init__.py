"""optax transforms and the factory that builds a chain from the config."""

from jaxllm.optim.came import CameState, came, scale_by_came
from jaxllm.optim.factory import DEFAULTS, build_optimizer, decay_mask, make_optimizer, resolved
from jaxllm.optim.groups import group_labels, grouped_optimizer, lr_scale_for_tokens
from jaxllm.optim.schedules import warmup_schedule

__all__ = [
    "DEFAULTS",
    "CameState",
    "build_optimizer",
    "came",
    "decay_mask",
    "group_labels",
    "grouped_optimizer",
    "lr_scale_for_tokens",
    "make_optimizer",
    "resolved",
    "scale_by_came",
    "warmup_schedule",
]
