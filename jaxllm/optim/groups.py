"""Per-parameter-group learning rates and weight decay, as an `optax.partition`.

`optim.groups` is a list of ``{pattern, lr_scale, weight_decay}``; a parameter belongs to the
first group whose regex is found (`re.search`) in its '/'-joined path, e.g.
``blocks/3/ffn/experts/w_up``; the rest form the base group. Every group runs the same
optimizer with its own learning rate (the schedule times `lr_scale`) and decay, so element-wise
optimizers behave exactly as without groups for `lr_scale=1`. Global-norm clipping stays outside
the partition (over all parameters).

`lr_scale_for_tokens` gives the scale for parameters that see only part of each batch — the
routed experts of a mixture of experts (Hunyuan-Large's expert-specific learning rate, arXiv
2411.02265): each expert sees about `tokens_total / n_experts · top_k` tokens per step, so its
optimal learning rate follows the batch-size law at that smaller batch.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np
import optax

from jaxllm.optim.registry import make_optimizer
from jaxllm.scaling.surge import surge_optimal_lr

BASE = "base"


def param_path(path) -> str:
    """'/'-joined keys of a pytree path: ``blocks/3/ffn/w_up``."""
    return "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def group_labels(patterns: list[str], params: Any) -> Any:
    """A pytree like `params` of labels: ``"group_<i>"`` for the first pattern found in the
    leaf's path, else ``"base"``."""
    compiled = [re.compile(p) for p in patterns]

    def label(path, _):
        name = param_path(path)
        for i, rx in enumerate(compiled):
            if rx.search(name):
                return f"group_{i}"
        return BASE

    return jax.tree_util.tree_map_with_path(label, params)


def grouped_optimizer(optim_cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
    """`optim_cfg`'s optimizer per group of `optim_cfg.groups`, partitioned by parameter path."""
    groups = optim_cfg.groups
    transforms = {BASE: make_optimizer(optim_cfg, schedule)}
    for i, g in enumerate(groups):
        scaled = (lambda s: lambda count: s * schedule(count))(g.lr_scale)
        transforms[f"group_{i}"] = make_optimizer(optim_cfg, scaled, weight_decay=g.weight_decay)
    return optax.partition(transforms, lambda p: group_labels([g.pattern for g in groups], p))


def lr_scale_for_tokens(
    tokens_seen, tokens_total, law: str = "sqrt", b_noise: float | None = None
) -> float:
    """Learning-rate factor for parameters that see `tokens_seen` of the `tokens_total` tokens
    of each step, relative to those that see all of them.

    - ``"linear"``: ``seen/total`` (SGD below the critical batch size).
    - ``"sqrt"``: ``sqrt(seen/total)`` (Adam/sign-style optimizers far below ``B_noise``).
    - ``"surge"``: the Surge law's ratio ``lr_opt(seen) / lr_opt(total)`` (Li et al., arXiv
      2405.14578, Eq. 2), with ``B_noise`` in tokens (from `jaxllm.scaling.fit_b_noise`); it
      tends to ``sqrt`` when both batches are far below ``B_noise``. Hunyuan-Large's routed
      experts (1/16 of the tokens) at ``B_noise = 4·total`` get 0.31.
    """
    seen, total = float(tokens_seen), float(tokens_total)
    if not 0 < seen <= total:
        raise ValueError(f"need 0 < tokens_seen ≤ tokens_total, got {seen} and {total}")
    if law == "linear":
        return seen / total
    if law == "sqrt":
        return float(np.sqrt(seen / total))
    if law == "surge":
        if b_noise is None or b_noise <= 0:
            raise ValueError("law='surge' needs a positive b_noise (tokens)")
        return float(surge_optimal_lr(seen, b_noise, 1.0) / surge_optimal_lr(total, b_noise, 1.0))
    raise ValueError(f"unknown law {law!r}: use 'sqrt', 'linear' or 'surge'")
