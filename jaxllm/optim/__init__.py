"""optax transforms and the factory that builds a chain from the config."""

from jaxllm.optim.came import CameState, came, scale_by_came
from jaxllm.optim.factory import build_optimizer, decay_mask
from jaxllm.optim.schedules import warmup_schedule

__all__ = ["CameState", "build_optimizer", "came", "decay_mask", "scale_by_came", "warmup_schedule"]
