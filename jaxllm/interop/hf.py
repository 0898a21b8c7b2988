"""Hugging Face checkpoints (Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE) in and out of
jaxllm.

    model, model_config = load_pretrained("path/to/hf_folder")   # config.json + *.safetensors
    logits_BTV = model(tokens_BT)
    save_pretrained(model, model_config, "path/to/out")           # reloads in `transformers`

The two layouts hold the same numbers. Hugging Face `nn.Linear` weights are [out, in]; jaxllm's
are [in, out] with heads split out (`wq [D, H, K]`, `wo [H, K, D]`), so each tensor is a
transpose and a reshape — views of the memory-mapped file until they are placed on the devices
(Mixtral's and Qwen2-MoE's per-expert tensors are stacked into jaxllm's [E, ...] expert
weights). RoPE needs no
permutation: jaxllm rotates the half-split pairs (i, i + K/2), the layout of the `rotate_half`
that Hugging Face's Llama code applies to these weights.

Loading streams one safetensors shard after another, one tensor at a time, straight into the
target shardings (`jax.make_array_from_callback` copies only each device's slice), so host
memory never holds a second copy of the model. Only `config.json` and safetensors are read —
never pickle, never remote code. A missing or unexpected tensor, a shape mismatch or an
unsupported architecture or option raises `HFError` naming it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm import models
from jaxllm.config import ModelConfig
from jaxllm.interop import safetensors
from jaxllm.interop.hf_config import (
    FAMILIES,
    HFError,
    config_for_init,
    family_of,
    hf_config_from_model,
    model_config_from_hf,
    read_hf_config,
)
from jaxllm.parallel.core.rules import sharding_for

__all__ = [
    "FAMILIES",
    "HFError",
    "Tensor",
    "config_for_init",
    "family_of",
    "hf_config_from_model",
    "load_params",
    "load_pretrained",
    "model_config_from_hf",
    "param_shardings",
    "read_hf_config",
    "save_params",
    "save_pretrained",
    "tensor_map",
]

# Buffers some old checkpoints saved next to the weights; they are recomputed, never read.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# --------------------------------------------------------------------- tensor mapping


@dataclass(frozen=True)
class Tensor:
    """One Hugging Face tensor and where it lives in jaxllm's parameter dict.

    `to_jax` turns the HF array (shape `hf_shape`) into jaxllm's (a view where possible);
    `to_hf` is its inverse. With `experts` = E > 0, `hf_name` holds `{j}` and the E tensors
    j = 0..E-1 are stacked on a new leading axis of the jaxllm parameter.
    """

    hf_name: str
    path: tuple[str | int, ...]
    hf_shape: tuple[int, ...]
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    experts: int = 0

    def names(self) -> list[str]:
        if not self.experts:
            return [self.hf_name]
        return [self.hf_name.format(j=j) for j in range(self.experts)]

    def jax_shape(self) -> tuple[int, ...]:
        shape = self.to_jax(np.empty(self.hf_shape, np.int8)).shape
        return (self.experts, *shape) if self.experts else shape


def _same(x):
    return x


def _transpose(x):
    return x.T


def tensor_map(cfg: ModelConfig) -> list[Tensor]:
    """Every tensor of the Hugging Face form of `cfg` (a model `family_of` accepts)."""
    family = family_of(cfg)
    d, h, g, k, f, v = (
        cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.qk_head_dim, cfg.d_ff, cfg.vocab_size,
    )  # fmt: skip
    options = cfg.mixers.get("softmax", {})

    def proj_in(n):  # [n*K, D] ↔ [D, n, K]
        return (lambda x: x.reshape(n, k, d).transpose(2, 0, 1),
                lambda x: x.transpose(1, 2, 0).reshape(n * k, d))  # fmt: skip

    def bias_in(n):  # [n*K] ↔ [n, K]
        return lambda x: x.reshape(n, k), lambda x: x.reshape(n * k)

    out = [Tensor("model.embed_tokens.weight", ("embed",), (v, d), _same, _same)]
    for i in range(cfg.n_layers):
        p, blk = f"model.layers.{i}.", ("blocks", i)
        attn = [
            ("q_proj.weight", "wq", (h * k, d), *proj_in(h)),
            ("k_proj.weight", "wk", (g * k, d), *proj_in(g)),
            ("v_proj.weight", "wv", (g * k, d), *proj_in(g)),
            ("o_proj.weight", "wo", (d, h * k),
             lambda x: x.reshape(d, h, k).transpose(1, 2, 0),
             lambda x: x.transpose(2, 0, 1).reshape(d, h * k)),
        ]  # fmt: skip
        if options.get("qkv_bias"):
            attn += [
                ("q_proj.bias", "bq", (h * k,), *bias_in(h)),
                ("k_proj.bias", "bk", (g * k,), *bias_in(g)),
                ("v_proj.bias", "bv", (g * k,), *bias_in(g)),
            ]
        if options.get("out_bias"):
            attn.append(("o_proj.bias", "bo", (d,), _same, _same))
        if options.get("qk_norm"):
            attn += [
                ("q_norm.weight", "q_norm", (k,), _same, _same),
                ("k_norm.weight", "k_norm", (k,), _same, _same),
            ]
        out += [Tensor(p + "self_attn." + a, (*blk, "mixer", b), s, fj, fh)
                for a, b, s, fj, fh in attn]  # fmt: skip
        if cfg.ffn == "moe" and family == "mixtral":
            e = int(cfg.ffns.get("moe", {}).get("n_experts", 8))
            moe, stack = p + "block_sparse_moe.", (*blk, "ffn", "groups", 0)
            t_ = _transpose
            out.append(Tensor(moe + "gate.weight", (*blk, "ffn", "w_router"), (e, d), t_, t_))
            for hf_w, name, shape in (("w1", "w_gate", (f, d)), ("w3", "w_up", (f, d)),
                                      ("w2", "w_down", (d, f))):  # fmt: skip
                path_ = (*stack, name)
                out.append(Tensor(moe + f"experts.{{j}}.{hf_w}.weight", path_, shape, t_, t_, e))
            mlp_norms = []
        elif cfg.ffn == "moe" and not _is_dense_layer(cfg, i):
            out += _qwen2_moe_tensors(cfg, p + "mlp.", (*blk, "ffn"))
            mlp_norms = []
        else:
            # A dense layer of a Qwen2-MoE model is the moe ffn's `dense` SwiGLU.
            ffn = ("ffn", "dense") if cfg.ffn == "moe" else ("ffn",)
            mlp_norms = [
                ("mlp.gate_proj.weight", (*ffn, "w_gate"), (f, d), _transpose),
                ("mlp.up_proj.weight", (*ffn, "w_up"), (f, d), _transpose),
                ("mlp.down_proj.weight", (*ffn, "w_down"), (d, f), _transpose),
            ]
        mlp_norms += [
            ("input_layernorm.weight", ("mixer_norm", "scale"), (d,), _same),
            ("post_attention_layernorm.weight", ("ffn_norm", "scale"), (d,), _same),
        ]
        out += [Tensor(p + a, (*blk, *b), s, fn, fn) for a, b, s, fn in mlp_norms]
    out.append(Tensor("model.norm.weight", ("final_norm", "scale"), (d,), _same, _same))
    if not cfg.tie_embeddings:
        out.append(Tensor("lm_head.weight", ("head",), (v, d), _transpose, _transpose))
    return out


def _is_dense_layer(cfg: ModelConfig, i: int) -> bool:
    return any(j % cfg.n_layers == i for j in cfg.ffns.get("moe", {}).get("dense_layers", []))


def _qwen2_moe_tensors(cfg: ModelConfig, p: str, ffn: tuple) -> list[Tensor]:
    """One sparse layer of Qwen2-MoE (prefix `p` = "model.layers.{i}.mlp."): router [E, D],
    E experts, the shared expert and its sigmoid gate [1, D] (jaxllm's `w_shared_gate` [D, 1])."""
    moe, d, t_ = cfg.ffns.get("moe", {}), cfg.d_model, _transpose
    e = int(moe.get("n_experts", 8))
    fe = int(moe.get("expert_d_ff") or cfg.d_ff)
    fs = int(moe.get("shared_d_ff") or fe)
    out = [
        Tensor(p + "gate.weight", (*ffn, "w_router"), (e, d), t_, t_),
        Tensor(p + "shared_expert_gate.weight", (*ffn, "w_shared_gate"), (1, d), t_, t_),
    ]
    for proj, name, f_shape, s_shape in (("gate_proj", "w_gate", (fe, d), (fs, d)),
                                         ("up_proj", "w_up", (fe, d), (fs, d)),
                                         ("down_proj", "w_down", (d, fe), (d, fs))):  # fmt: skip
        expert = (*ffn, "groups", 0, name)
        out += [
            Tensor(p + f"experts.{{j}}.{proj}.weight", expert, f_shape, t_, t_, e),
            Tensor(p + f"shared_expert.{proj}.weight", (*ffn, "shared", name), s_shape, t_, t_),
        ]
    return out


def _check_covers(cfg: ModelConfig, tensors: list[Tensor], abstract: dict) -> None:
    """The mapping fills exactly the model's parameters, with their shapes."""
    flat = {
        tuple(getattr(k, "key", k) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]
    }
    mapped = {t.path: t for t in tensors}
    for path in flat.keys() - mapped.keys():
        raise HFError(f"model parameter {'/'.join(map(str, path))} has no Hugging Face tensor")
    for path in mapped.keys() - flat.keys():
        raise HFError(f"{mapped[path].hf_name} maps to {path}, which the model does not have")
    for path, t in mapped.items():
        want = t.jax_shape()
        if want != flat[path].shape:
            raise HFError(f"{t.hf_name}: maps to shape {want}, model has {flat[path].shape}")


def _set(tree: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def abstract_params(cfg: ModelConfig) -> dict:
    model = nnx.eval_shape(lambda: models.build(cfg, nnx.Rngs(params=0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def param_shardings(cfg: ModelConfig, mesh: jax.sharding.Mesh) -> dict:
    """The NamedSharding of every parameter of `cfg` on `mesh`, by the logical-axis rules."""
    model = nnx.eval_shape(lambda: models.build(cfg, nnx.Rngs(params=0)))
    state = nnx.state(model, nnx.Param)
    is_var = lambda x: isinstance(x, nnx.Variable)
    shardings = jax.tree.map(
        lambda v: sharding_for(v.get_metadata().get("axes"), v.shape, mesh), state, is_leaf=is_var
    )
    return nnx.to_pure_dict(shardings)


# ------------------------------------------------------------------------------ loading


def load_params(path: str | Path, cfg: ModelConfig, *, shardings: dict | None = None) -> dict:
    """The parameter dict of `cfg` from the safetensors in `path`, in `cfg.param_dtype`.

    With `shardings` (a dict of `NamedSharding` shaped like the parameters) every array is
    created directly in its sharding; without, on the default device. A scanned model
    (`model.scan_layers`) is read layer by layer, then its layers are stacked: the stacked
    layers take twice their memory while that runs.
    """
    plan = models.scan_plan(cfg)
    if plan is not None:
        flat = cfg.model_copy(update={"scan_layers": False})
        if shardings is None:
            return models.stack_params(load_params(path, flat), plan)
        per_layer = models.unstack_params(shardings, plan, take=_layer_sharding)
        stack = jax.jit(
            lambda p: models.stack_params(p, plan), out_shardings=shardings, donate_argnums=0
        )
        return stack(load_params(path, flat, shardings=per_layer))
    tensors = tensor_map(cfg)
    abstract = abstract_params(cfg)
    _check_covers(cfg, tensors, abstract)
    ckpt = safetensors.Checkpoint(path)
    by_name = {name: t for t in tensors for name in t.names()}
    missing = [name for name in by_name if name not in ckpt]
    if missing:
        raise HFError(
            f"{path}: the checkpoint has no tensor {missing[0]!r} ({len(missing)} missing)"
        )
    tied_head = cfg.tie_embeddings and "lm_head.weight" in ckpt
    for name in ckpt.names():
        if (
            name not in by_name
            and not name.endswith(_IGNORED_SUFFIXES)
            and not (tied_head and name == "lm_head.weight")
        ):
            raise HFError(f"{path}: unexpected tensor {name!r} (an option jaxllm does not map)")
    dtype = jnp.dtype(cfg.param_dtype)
    params: dict = {}
    for _, names in ckpt.by_file():
        for name in names:
            t = by_name.get(name)
            # A stacked parameter is placed when its first tensor's shard comes up.
            if t is None or name != t.names()[0]:
                continue
            views = []
            for part in t.names():
                f = ckpt.file(part)
                if f.shape(part) != t.hf_shape:
                    raise HFError(
                        f"{f.path}: {part} has shape {f.shape(part)}, expected {t.hf_shape}"
                    )
                views.append(t.to_jax(f.get(part)))
            sharding = _get(shardings, t.path)
            value = _place(views[0], dtype, sharding) if not t.experts else (
                _place_stacked(views, dtype, sharding)
            )  # fmt: skip
            _set(params, t.path, value)
        ckpt.close_files()
    return params


def _layer_sharding(stacked: jax.sharding.NamedSharding, _) -> jax.sharding.NamedSharding:
    """The sharding of one layer of a stacked parameter: its spec without the layers axis."""
    return jax.sharding.NamedSharding(stacked.mesh, jax.sharding.PartitionSpec(*stacked.spec[1:]))


def _get(tree: dict | None, path: tuple):
    if tree is None:
        return None
    for key in path:
        tree = tree[key]
    return tree


def _place_stacked(views: list[np.ndarray], dtype, sharding) -> jax.Array:
    """[E, ...] from E views, each device reading only its experts' slices."""
    shape = (len(views), *views[0].shape)

    def piece(index):
        return np.stack([np.asarray(views[j][index[1:]], dtype=dtype)
                         for j in range(len(views))[index[0]]])  # fmt: skip

    if sharding is None:
        return jnp.asarray(piece((slice(None),) * len(shape)))
    return jax.make_array_from_callback(shape, sharding, piece)


def _place(view: np.ndarray, dtype, sharding) -> jax.Array:
    if sharding is None:
        return jnp.asarray(np.asarray(view, dtype=dtype))
    return jax.make_array_from_callback(
        view.shape, sharding, lambda index: np.asarray(view[index], dtype=dtype)
    )


def load_pretrained(
    path: str | Path,
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    max_seq_len: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[nnx.Module, ModelConfig]:
    """(model, model_config) of the Hugging Face folder `path`; the model maps tokens [B, T] to
    logits [B, T, V] like any jaxllm decoder. With `mesh`, parameters land in its shardings."""
    cfg = model_config_from_hf(
        read_hf_config(path), dtype=dtype, param_dtype=param_dtype, max_seq_len=max_seq_len
    )
    shardings = param_shardings(cfg, mesh) if mesh is not None else None
    params = load_params(path, cfg, shardings=shardings)
    model = nnx.eval_shape(lambda: models.build(cfg, nnx.Rngs(params=0)))
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state, rest), cfg


# ------------------------------------------------------------------------------ saving


def save_params(
    params: dict,
    cfg: ModelConfig,
    path: str | Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 4 * 2**30,
) -> Path:
    """Write `params` (jaxllm's parameter dict of `cfg`) as a Hugging Face folder: config.json
    and safetensors shards of at most `max_shard_bytes` (one tensor at a time in host memory).
    `dtype` (default: `cfg.param_dtype`) is the dtype of the written tensors."""
    plan = models.scan_plan(cfg)
    if plan is not None:
        # the stacked layers once on the host; each layer is a view of them
        params = models.unstack_params({**params, "scan": jax.device_get(params["scan"])}, plan)
        cfg = cfg.model_copy(update={"scan_layers": False})
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    np_dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
    tensors = tensor_map(cfg)
    _check_covers(
        cfg, tensors, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    )

    cached: dict[tuple, np.ndarray] = {}

    def host(path: tuple) -> np.ndarray:
        # Only the parameter being written is kept on the host (the experts of a stacked one
        # are written one after another from the same copy).
        if path not in cached:
            cached.clear()
            cached[path] = np.asarray(jax.device_get(_get(params, path)), np_dtype)
        return cached[path]

    # (HF name, shape, produce) of every tensor, in the mapping's order.
    entries = []
    for t in tensors:
        for j, name in enumerate(t.names()):
            if t.experts:
                produce = lambda t=t, j=j: t.to_hf(host(t.path)[j])
            else:
                produce = lambda t=t: t.to_hf(host(t.path))
            entries.append((name, t.hf_shape, np_dtype, produce))

    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = int(np.prod(entry[1])) * np_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    total = 0
    for fname, shard in zip(names, shards):
        total += safetensors.write(out / fname, shard, {"format": "pt"})
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {e[0]: f for f, s in zip(names, shards) for e in s},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf = hf_config_from_model(cfg, dtype=np_dtype.name)
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return out


def save_pretrained(model: nnx.Module, cfg: ModelConfig, path: str | Path, **kw) -> Path:
    """Write a jaxllm model as a Hugging Face folder (see `save_params` for the options)."""
    return save_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg, path, **kw)
