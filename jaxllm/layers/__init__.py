"""NNX layers, one file per family member; importing this package registers every mixer."""

from jaxllm.layers import (  # noqa: F401  (importing a layer file registers it)
    attention,
    attention_moe,
    cla,
    clla,
    cog,
    dape,
    glu,
    hgrn2,
    infini,
    lcsm,
    lightning,
    mlp,
    moe,
)
from jaxllm.layers.registry import ffn, ffns, mixer, mixers, register_ffn, register_mixer

__all__ = ["ffn", "ffns", "mixer", "mixers", "register_ffn", "register_mixer"]
