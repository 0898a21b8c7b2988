"""jaxllm: a JAX / Flax NNX library and trainer for large language models.

Start with `jaxllm.config.load(preset, overrides)` and `jaxllm.models.build(cfg.model, rngs)`;
the ops (`jaxllm.ops`), optimizers (`jaxllm.optim`) and scaling laws (`jaxllm.scaling`) work on
their own too.
"""

import os

__version__ = "0.1.0"


def _avoid_ynn_fusion_crash() -> None:
    """jaxlib 0.10's XLA:CPU runs some transposes through YNNPACK fusions that segfault
    (slinky `fuse_contiguous_dims`, e.g. the gradient of chunked gated linear attention with
    two or more heads on AMD EPYC hosts). Turn those fusions off unless the user set the flag;
    only the CPU backend reads it, and only when it starts, so import jaxllm before using jax."""
    try:
        from jaxlib.version import __version__ as jaxlib_version
    except ImportError:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if jaxlib_version.startswith("0.10.") and "ynn_fusion_type" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_experimental_ynn_fusion_type=".strip()


_avoid_ynn_fusion_crash()
