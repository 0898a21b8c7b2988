"""Causal softmax attention with packed documents and GQA (FlashAttention-2) as Pallas Triton
kernels, for the GPU's packed train batches.

`flash_attention` (api.py) is the entry point: a custom_vjp over the forward, dq and dk/dv
kernels (gpu.py), compiled where lowered for CUDA and interpreted elsewhere.
"""

from kernels_pallas.flash_attention.api import flash_attention, gpu_available, unsupported

__all__ = ["flash_attention", "gpu_available", "unsupported"]
