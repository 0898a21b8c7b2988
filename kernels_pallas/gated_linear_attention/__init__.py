"""Gated linear attention (a per-key-channel, data-dependent decay: HGRN2, GLA) as Pallas
kernels.

`gated_linear_attention` (api.py) is the entry point: a custom_vjp over the TPU (tpu.py,
Mosaic) and GPU (gpu.py, Triton) kernels, chosen by the platform the computation is lowered
for, and the TPU kernel in interpret mode on the CPU. Both run the chunk math of chunk.py.
"""

from kernels_pallas.gated_linear_attention.api import gated_linear_attention, gpu_available

__all__ = ["gated_linear_attention", "gpu_available"]
