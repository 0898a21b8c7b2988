"""jaxllm: a JAX / Flax NNX library and trainer for large language models.

Start with `jaxllm.config.load(preset, overrides)` and `jaxllm.models.build(cfg.model, rngs)`;
the ops (`jaxllm.ops`), optimizers (`jaxllm.optim`) and scaling laws (`jaxllm.scaling`) work on
their own too.
"""

__version__ = "0.1.0"
