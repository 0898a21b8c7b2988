"""Infini-attention (`infini`; Munkhdalai et al. 2404.07143): causal softmax within segments of
N tokens plus a compressive memory of all earlier segments.

Per kv head, with σ = ELU + 1 and the memory (M [K, V], z [K]) as it stood before segment s:

    A_mem = σ(Q) M / (σ(Q) z + ε)                                    retrieval
    M ← M + σ(K)ᵀ V,                         z ← z + Σ_t σ(K_t)       linear update
    M ← M + σ(K)ᵀ (V − σ(K) M / (σ(K) z + ε))                         delta update
    A = sigmoid(β) ⊙ A_mem + (1 − sigmoid(β)) ⊙ A_dot                 β: one scalar per head

The memory is read before the segment updates it (reading after would leak the segment's
later tokens into its earlier ones). ε = 1e-6 keeps the empty memory (M = 0, z = 0) at 0 rather
than 0/0. Training scans over segments; decoding keeps only the current segment's K/V (N slots)
and (M, z), so generation memory is bounded whatever the length. A prompt of P > 1 tokens is
prefilled a whole segment at a time through the training scan (`_prefill`), one token with
the decode step. With packed documents
(segment ids) the memory holds one document at a time: it restarts when a segment ends in a new
document, takes only that document's keys and answers only that document's queries, so packed
documents never see each other (segments stay aligned to the row, not to each document).
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
from pydantic import Field

from jaxllm.layers.attn_common import QKVO, AttnVariantConfig, Cache, finish_qk
from jaxllm.layers.base import param
from jaxllm.layers.registry import register_mixer
from jaxllm.ops.attention import attention

EPS = 1e-6


class InfiniConfig(AttnVariantConfig):
    segment_len: int = Field(64, ge=1, description="N, tokens per segment")
    update: Literal["linear", "delta"] = "delta"
    impl: Literal["auto", "reference", "xla", "cudnn"] = "auto"


def sigma(x: jax.Array) -> jax.Array:
    return jax.nn.elu(x.astype(jnp.float32)) + 1.0


def retrieve(sq_BTHK: jax.Array, m_BGKV: jax.Array, z_BGK: jax.Array) -> jax.Array:
    """σ(Q) M / (σ(Q) z + ε), query heads grouped onto their kv head → [B, T, H, V]."""
    b, t, h, k = sq_BTHK.shape
    g = m_BGKV.shape[1]
    sq = sq_BTHK.reshape(b, t, g, h // g, k)
    num = jnp.einsum("BTGRK,BGKV->BTGRV", sq, m_BGKV)
    den = jnp.einsum("BTGRK,BGK->BTGR", sq, z_BGK)[..., None] + EPS
    return (num / den).reshape(b, t, h, -1)


def update(m_BGKV, z_BGK, sk_BTGK, v_BTGV, kind: str):
    """The memory after one segment of σ(K) and V (rows of zeros change nothing)."""
    v = v_BTGV.astype(jnp.float32)
    if kind == "delta":
        old = jnp.einsum("BTGK,BGKV->BTGV", sk_BTGK, m_BGKV)
        old = old / (jnp.einsum("BTGK,BGK->BTG", sk_BTGK, z_BGK)[..., None] + EPS)
        v = v - old
    return (
        m_BGKV + jnp.einsum("BTGK,BTGV->BGKV", sk_BTGK, v),
        z_BGK + jnp.sum(sk_BTGK, axis=1),
    )


@register_mixer("infini", InfiniConfig)
class InfiniAttention(QKVO):
    """x: [B, T, D] → [B, T, D]; the cache holds one segment of K/V plus (M, z)."""

    def __init__(self, cfg: InfiniConfig, *, rngs):
        super().__init__(cfg, rngs=rngs)
        self.cfg = cfg
        self.k_norm = (
            param(rngs, (cfg.head_dim,), ("head_dim",), init="ones") if cfg.qk_norm else None
        )
        self.beta = param(rngs, (cfg.n_heads,), ("heads",), init="zeros")

    def init_cache(self, batch: int, max_len: int) -> Cache:
        c = self.cfg
        n, g, k = c.segment_len, c.n_kv_heads, c.head_dim
        return {
            "k": jnp.zeros((batch, n, g, k), c.compute_dtype),
            "v": jnp.zeros((batch, n, g, k), c.compute_dtype),
            "M": jnp.zeros((batch, g, k, k), jnp.float32),
            "z": jnp.zeros((batch, g, k), jnp.float32),
            "end": jnp.zeros((), jnp.int32),
        }

    def _gate(self, a_mem_BTHV, a_dot_BTHV):
        w = jax.nn.sigmoid(self.beta[...])[:, None]
        return w * a_mem_BTHV + (1 - w) * a_dot_BTHV.astype(jnp.float32)

    def __call__(self, x_BTD, *, positions_BT, segment_ids_BT=None, cache=None) -> tuple[Any, Any]:
        c = self.cfg
        dt = c.compute_dtype
        x_BTD = x_BTD.astype(dt)
        q_BTHK = finish_qk(self.q(x_BTD), self.q_norm, positions_BT, c)
        k_BTGK, v_BTGK = self.kv(x_BTD)
        k_BTGK = finish_qk(k_BTGK, self.k_norm, positions_BT, c)
        if cache is None:
            o = self._segments(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT)
        elif q_BTHK.shape[1] == 1:
            o, cache = self._decode_step(q_BTHK, k_BTGK, v_BTGK, cache)
        else:
            o, cache = self._prefill(q_BTHK, k_BTGK, v_BTGK, cache)
        return self.o(o.astype(dt)), cache

    def _scan(self, q_BTHK, k_BTGK, v_BTGK, sid_BT, doc_BT, init, fold_S):
        """Segments of N tokens (T a multiple of N), each read against the memory as it stood
        before it and folded into it afterwards where fold_S [T/N] bool says so.

        sid_BT: segment ids for the causal softmax (None: one document); doc_BT [B, T] int32:
        the document whose memory a token reads and writes (below); init = (M [B, G, K, V],
        z [B, G, K], the document in M [B]). Returns (out [B, T, H, V] float32, final init).
        """
        c = self.cfg
        b, t, h, kd = q_BTHK.shape
        g, n = k_BTGK.shape[2], c.segment_len
        ns = t // n
        seg = lambda x: x.reshape(b * ns, n, *x.shape[2:])
        sid = None if sid_BT is None else seg(sid_BT)
        a_dot = attention(seg(q_BTHK), seg(k_BTGK), seg(v_BTGK), segment_ids_BT=sid, impl=c.impl)
        a_dot = a_dot.reshape(b, ns, n, h, -1)
        sq = sigma(q_BTHK).reshape(b, ns, n, h, kd)
        sk = sigma(k_BTGK).reshape(b, ns, n, g, kd)
        vs = v_BTGK.reshape(b, ns, n, g, -1)
        doc = doc_BT.reshape(b, ns, n)

        def body(carry, xs):
            m, z, mem_doc = carry
            sq_s, sk_s, v_s, d_s, fold = xs
            # The memory holds one document (`mem_doc`); other documents' queries read nothing.
            a_mem = retrieve(sq_s, m, z) * (d_s == mem_doc[:, None])[..., None, None]
            # It is refilled from zero when the segment ends in another document, and only that
            # document's keys enter it, so packed documents never see each other.
            last = d_s[:, -1]
            fresh = (last != mem_doc)[:, None, None]
            m_new, z_new = jnp.where(fresh[..., None], 0.0, m), jnp.where(fresh, 0.0, z)
            keep = (d_s == last[:, None])[..., None, None]
            new = (*update(m_new, z_new, sk_s * keep, v_s, c.update), last)
            return jax.tree.map(lambda x, y: jnp.where(fold, x, y), new, carry), a_mem

        swap = lambda x: jnp.moveaxis(x, 1, 0)
        final, a_mem = jax.lax.scan(body, init, (swap(sq), swap(sk), swap(vs), swap(doc), fold_S))
        return self._gate(swap(a_mem), a_dot).reshape(b, t, h, -1), final

    def _segments(self, q_BTHK, k_BTGK, v_BTGK, segment_ids_BT):
        """Training: the row from an empty memory, every segment folded."""
        b, t = q_BTHK.shape[:2]
        g, kd = k_BTGK.shape[2:]
        n = self.cfg.segment_len
        ns = -(-t // n)

        def pad(x, value=0):  # the padded tail is after every real token
            widths = [(0, 0), (0, ns * n - t)] + [(0, 0)] * (x.ndim - 2)
            return jnp.pad(x, widths, constant_values=value)

        sid = None if segment_ids_BT is None else pad(segment_ids_BT)
        # Document id per token (-1 on the padded tail, which matches no document).
        doc = jnp.zeros((b, t), jnp.int32) if segment_ids_BT is None else segment_ids_BT
        doc = pad(doc.astype(jnp.int32), -1)
        m0 = jnp.zeros((b, g, kd, v_BTGK.shape[-1]), jnp.float32)
        z0 = jnp.zeros((b, g, kd), jnp.float32)
        init = (m0, z0, jnp.full((b,), -2, jnp.int32))
        fold = jnp.ones((ns,), bool)
        out, _ = self._scan(pad(q_BTHK), pad(k_BTGK), pad(v_BTGK), sid, doc, init, fold)
        return out[:, :t]

    def _prefill(self, q_BTHK, k_BTGK, v_BTGK, cache):
        """P > 1 tokens against the cache, whole segments at a time through `_scan`.

        The cache holds the current segment's first `end % N` slots. A buffer of ⌈(N + P)/N⌉
        segments takes those slots, then the P tokens from slot `end % N`, so its segments are
        the row's; the memory folds the segments the prompt fills, and the segment being
        filled at the end becomes the cache's K/V (slots after it are masked by causality).
        """
        n = self.cfg.segment_len
        b, p = q_BTHK.shape[:2]
        ns = -(-(n + p) // n)
        off = cache["end"] % n

        def buffer(cached, new):
            buf = jnp.zeros((b, ns * n, *new.shape[2:]), new.dtype)
            if cached is not None:
                buf = buf.at[:, :n].set(cached.astype(new.dtype))
            return jax.lax.dynamic_update_slice_in_dim(buf, new, off, 1)

        q = buffer(None, q_BTHK)
        k, v = buffer(cache["k"], k_BTGK), buffer(cache["v"], v_BTGK)
        filled = off + p
        doc = jnp.zeros((b, ns * n), jnp.int32)
        init = (cache["M"], cache["z"], jnp.zeros((b,), jnp.int32))
        fold = jnp.arange(ns) < filled // n
        out, (m, z, _) = self._scan(q, k, v, None, doc, init, fold)
        tail = (filled // n) * n
        new = {
            "k": jax.lax.dynamic_slice_in_dim(k, tail, n, 1).astype(cache["k"].dtype),
            "v": jax.lax.dynamic_slice_in_dim(v, tail, n, 1).astype(cache["v"].dtype),
            "M": m, "z": z, "end": cache["end"] + p,
        }  # fmt: skip
        return jax.lax.dynamic_slice_in_dim(out, off, p, 1), new

    def _decode_step(self, q_BTHK, k_BTGK, v_BTGK, cache):
        """One token: write its slot, attend within the segment, read the memory, and fold the
        segment into the memory when its last slot is filled."""
        c = self.cfg
        n = c.segment_len
        end = cache["end"]
        slot = end % n
        kb = jax.lax.dynamic_update_slice_in_dim(
            cache["k"], k_BTGK.astype(cache["k"].dtype), slot, 1
        )
        vb = jax.lax.dynamic_update_slice_in_dim(
            cache["v"], v_BTGK.astype(cache["v"].dtype), slot, 1
        )
        a_dot = attention(q_BTHK, kb, vb, q_positions_BT=slot[None, None],
                          kv_positions_BS=jnp.arange(n)[None], impl=c.impl)  # fmt: skip
        a_mem = retrieve(sigma(q_BTHK), cache["M"], cache["z"])
        out = self._gate(a_mem, a_dot)
        m, z = update(cache["M"], cache["z"], sigma(kb), vb, c.update)
        full = slot == n - 1
        new = {
            "k": kb, "v": vb,
            "M": jnp.where(full, m, cache["M"]), "z": jnp.where(full, z, cache["z"]),
            "end": end + 1,
        }  # fmt: skip
        return out, new

    @staticmethod
    def token_mixing_flops(cfg: InfiniConfig, seq_len: int) -> float:
        """Causal softmax within a segment of N tokens (QKᵀ and PV, causal half), plus the
        memory's products per token: the read σ(Q)M and σ(Q)z per query head, the write
        σ(K)ᵀV per kv head and, for the delta rule, σ(K)M and σ(K)z per kv head."""
        h, g, k = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        local = 2.0 * min(cfg.segment_len, seq_len) * h * (k + k) * 0.5
        read = 2.0 * h * (k * k + k)
        write = 2.0 * g * k * k
        if cfg.update == "delta":
            write += 2.0 * g * (k * k + k)
        return local + read + write
