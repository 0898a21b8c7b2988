"""KV-cache bytes per token and decoding tokens/s for MHA, GQA, GQA + CLA2 and CLLA at one base
shape (1.3B-ish: d 2560, 40 heads of 64, 16 layers, SwiGLU 6912, vocab 32000; bfloat16).

    python benchmarks/kv_cache.py [--layers N] [--batch 8] [--prompt 128] [--new 32]

GQA uses 4 KV heads (H/G = 10, Hunyuan-Large's 80/8), so GQA + CLA2 is Hunyuan-Large's recipe:
5% of MHA. CLLA shares a 512 + 64-channel latent over pairs of layers, cached as int4 with one
float16 scale per 32 channels (the paper claims under 2% of MHA).

Bytes per token are analytic for the full depth and measured from the cache arrays of the
model actually built (`jaxllm.sampling.kv_cache_bytes`); the script stops if the two disagree
at the built depth. On the CPU the depth defaults to 2 layers so that it runs in a minute or
two; tokens/s is then for that depth. Prints a table and writes
benchmarks/results/kv_cache.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm import config, models
from jaxllm.sampling import kv_cache_bytes

BASE = [
    "model.d_model=2560", "model.n_heads=40", "model.head_dim=64", "model.d_ff=6912",
    "model.vocab_size=32000", "model.dtype=bfloat16", "model.max_seq_len=4096",
    "data.seq_len=2048",
]  # fmt: skip
FULL_LAYERS = 16
CLLA = dict(latent_dim=512, rope_dim=64, share_factor=2, quant="int4", quant_group=32)
VARIANTS = {
    "MHA": ["model.n_kv_heads=40"],
    "GQA (G=4)": ["model.n_kv_heads=4"],
    "GQA + CLA2": ["model.n_kv_heads=4", "model.mixer=cla", "model.mixers.cla.share_factor=2"],
    "CLLA (int4, share 2)": ["model.n_kv_heads=40", "model.mixer=clla"]
    + [f"model.mixers.clla.{k}={v}" for k, v in CLLA.items()],
}


def analytic_bytes_per_token(m: config.ModelConfig) -> float:
    """Cache bytes per token of a model built from `m` (bfloat16 K/V; CLLA codes + scales)."""
    if m.mixer == "clla":
        o = m.mixers["clla"]
        ch = o["latent_dim"] + o["rope_dim"]
        codes = ch / 2 if o["quant"] == "int4" else ch
        return math.ceil(m.n_layers / o["share_factor"]) * (codes + 2 * ch / o["quant_group"])
    groups = m.n_layers
    if m.mixer == "cla":
        groups = math.ceil(m.n_layers / m.mixers["cla"]["share_factor"])
    return groups * 2 * m.kv_heads * m.qk_head_dim * 2


def decode_tokens_per_s(m: config.ModelConfig, batch: int, prompt: int, new: int) -> float:
    graph, state = nnx.split(models.build(m, 0))

    @jax.jit
    def step(state, tok_BT, cache):
        logits, cache = nnx.merge(graph, state)(tok_BT, cache=cache)
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

    model = nnx.merge(graph, state)
    cache = model.init_cache(batch, prompt + new + 1)
    tok, cache = step(state, jnp.ones((batch, prompt), jnp.int32), cache)
    tok, cache = step(state, tok[:, None], cache)  # compile the one-token shape
    jax.block_until_ready(tok)
    t0 = time.perf_counter()
    for _ in range(new - 1):
        tok, cache = step(state, tok[:, None], cache)
    jax.block_until_ready(tok)
    if not bool(jnp.all((tok >= 0) & (tok < m.vocab_size))):
        raise SystemExit("check failed: decoded token ids out of range")
    return batch * (new - 1) / (time.perf_counter() - t0)


def main() -> None:
    on_cpu = jax.default_backend() == "cpu"
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2 if on_cpu else FULL_LAYERS)
    ap.add_argument("--batch", type=int, default=4 if on_cpu else 32)
    ap.add_argument("--prompt", type=int, default=64 if on_cpu else 1024)
    ap.add_argument("--new", type=int, default=16 if on_cpu else 128)
    args = ap.parse_args()
    rows = []
    for name, opts in VARIANTS.items():
        full = config.load("default", [*BASE, *opts, f"model.n_layers={FULL_LAYERS}"]).model
        built = config.load("default", [*BASE, *opts, f"model.n_layers={args.layers}"]).model
        measured = kv_cache_bytes(models.build(built, 0))["per_token"]
        if measured != analytic_bytes_per_token(built):
            raise SystemExit(
                f"check failed: {name}: cache arrays give {measured} bytes/token, "
                f"the formula {analytic_bytes_per_token(built)}"
            )
        rows.append({
            "variant": name,
            "bytes_per_token": analytic_bytes_per_token(full),
            "bytes_per_token_measured": measured,
            "measured_layers": args.layers,
            "decode_tokens_per_s": decode_tokens_per_s(built, args.batch, args.prompt, args.new),
        })  # fmt: skip
    mha = rows[0]["bytes_per_token"]
    print(f"{FULL_LAYERS}-layer base, bytes/token analytic; measured and tokens/s at "
          f"{args.layers} layers, batch {args.batch}, {jax.devices()[0].device_kind}")  # fmt: skip
    print(f"{'variant':<22} {'bytes/token':>12} {'% of MHA':>9} {'measured':>10} {'tok/s':>9}")
    for r in rows:
        r["percent_of_mha"] = 100 * r["bytes_per_token"] / mha
        print(
            f"{r['variant']:<22} {r['bytes_per_token']:>12,.0f} {r['percent_of_mha']:>8.2f}% "
            f"{r['bytes_per_token_measured']:>10,.0f} {r['decode_tokens_per_s']:>9,.1f}"
        )
    out = Path(__file__).parent / "results" / "kv_cache.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "device": jax.devices()[0].device_kind,
                               "rows": rows}, indent=2))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
