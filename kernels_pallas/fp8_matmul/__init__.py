"""FP8 GEMM with per-tensor or fine-grained (DeepSeek-V3) scales: a Mosaic kernel for TPU, a
Triton kernel for NVIDIA GPUs, and a plain-jnp reference. See `api.py`."""

from kernels_pallas.fp8_matmul.api import fp8_matmul, fp8_matmul_reference

__all__ = ["fp8_matmul", "fp8_matmul_reference"]
