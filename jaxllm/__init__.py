"""jaxllm: a JAX / Flax NNX library and trainer for large language models.

    from jaxllm import config, models
    cfg = config.load("default")
    model = models.build(cfg.model, rngs)
"""

__version__ = "0.1.0"
