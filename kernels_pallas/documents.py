"""Packed documents for the linear-attention kernels: the runs and the per-token reset masks.

A packed row resets the state at each document start, S_t = (1 − r_t) λ S_{t−1} + k_tᵀ v_t,
the initial state continuing into the row's first document (λ a per-channel diag(exp(g_t)) for
gated linear attention). The kernels (lightning_attention/ and gated_linear_attention/, TPU
and GPU) cut the row into chunks of C tokens and, with p the run of the token before a chunk
(the first token's own run for the first chunk) and l the run of its last token, mask

    D ← D ⊙ [run_j = run_i],   O_inter ← O_inter ⊙ [run_j = p],
    S ← [l = p] λ^L S + (diag(λ^{L−1−i} [run_i = l]) K)ᵀ V,

and the backward pass applies the same masks (every term is linear in them). The per-token
masks depend only on the chunking, so they are formed here, outside the kernels; [l = p] is
the chunk minimum of [run = p] (runs never decrease).
"""

import jax.numpy as jnp


def document_runs(segment_ids_BT):
    """[B, T] ids → [B, T] int32: how many document starts precede each token (0 at t = 0);
    the XLA paths (`jaxllm.ops.linear_chunks`) use it too."""
    change_BT = segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]
    zeros_B1 = jnp.zeros((segment_ids_BT.shape[0], 1), jnp.int32)
    return jnp.concatenate([zeros_B1, jnp.cumsum(change_BT, axis=1, dtype=jnp.int32)], axis=1)


def mask_inputs(run_BT, C):
    """The kernels' per-token inputs for chunks of C tokens, from run_BT [B, T] int32 (T a
    multiple of C; padding repeats the last run): the run as a column [B, T, 1] and as a row
    [B, 1, T] (a chunk's [C, C] same-document mask compares the two; neither Mosaic nor
    Triton transposes a vector), and the float32 columns [run = p] (the tokens that read the
    incoming state) and [run = l] (the keys that enter the outgoing state)."""
    B, T = run_BT.shape
    run_BNC = run_BT.astype(jnp.int32).reshape(B, T // C, C)
    prev_BN = jnp.concatenate([run_BNC[:, :1, 0], run_BNC[:, :-1, -1]], axis=1)
    last_BN = run_BNC[:, :, -1]

    def column(mask_BNC):
        return mask_BNC.astype(jnp.float32).reshape(B, T, 1)

    keep_in, keep_out = column(run_BNC == prev_BN[..., None]), column(run_BNC == last_BN[..., None])
    return run_BNC.reshape(B, T, 1), run_BNC.reshape(B, 1, T), keep_in, keep_out
