"""NNX layers, one file per family member; importing this package registers every mixer."""

from jaxllm.layers import attention, mlp  # noqa: F401  (registration)
from jaxllm.layers.registry import ffn, ffns, mixer, mixers, register_ffn, register_mixer

__all__ = ["ffn", "ffns", "mixer", "mixers", "register_ffn", "register_mixer"]
