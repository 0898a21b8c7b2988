"""Lightning Attention-2 (causal linear attention with a per-head decay) as Pallas kernels.

`lightning_attention` (api.py) is the entry point: a custom_vjp over the TPU (tpu.py, Mosaic)
and GPU (gpu.py, Triton) kernels, chosen by the platform the computation is lowered for, and
the TPU kernel in interpret mode on the CPU. Both kernel modules implement
`forward(q, k, v, g, s0, *, run_BT, seq_len, block_t, block_v, interpret)` and
`backward(q, k, v, g, s0, do, dsT, *, run_BT, seq_len, block_t, block_v, interpret)` on
head-major [B, H, T, K] arrays; `run_BT` (packed documents: the state reset at each document
start, kernels_pallas/documents.py) is what `lightning_attention(..., segment_ids=...)` passes.
"""

from kernels_pallas.lightning_attention.api import gpu_available, lightning_attention

__all__ = ["gpu_available", "lightning_attention"]
