"""Hugging Face `config.json` ⇄ jaxllm `ModelConfig`, for the families `jaxllm.interop.hf`
reads and writes: Llama, Mistral, Qwen2, Qwen3 (dense), Mixtral and Qwen2-MoE (MoE).

What maps: sizes, GQA, head_dim, tied embeddings, q/k/v and output biases, QK-norm, RMSNorm
eps, RoPE theta and scaling (linear, llama3; both the `rope_parameters` of transformers ≥ 5 and
the older `rope_theta` / `rope_scaling`), Mixtral's router, and Qwen2-MoE's (expert and shared
expert widths, the sigmoid-gated shared expert, `norm_topk_prob`, the dense layers of
`mlp_only_layers` / `decoder_sparse_step`). Anything else that changes the
function (another activation, MLP biases, other RoPE scalings) is an `HFError` naming it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from jaxllm import config as config_lib
from jaxllm.config import Config, ConfigError, ModelConfig

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe")
_MOE_FAMILIES = ("mixtral", "qwen2_moe")
_ARCHITECTURE = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# The options of the softmax mixer an exported model may use; any other is not expressible.
_EXPORTABLE_OPTIONS = {"rope_theta", "rope_scaling", "qk_norm", "qkv_bias", "out_bias", "impl"}


class HFError(ConfigError):
    """A checkpoint jaxllm cannot read or a model it cannot write, with the reason."""


# ------------------------------------------------------------------------------ configs


def read_hf_config(path: str | Path) -> dict[str, Any]:
    file = Path(path) / "config.json"
    if not file.exists():
        raise HFError(f"{path}: no config.json (expected a Hugging Face model folder)")
    try:
        hf = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise HFError(f"{file}: not JSON ({e.msg})") from None
    if not isinstance(hf, dict):
        raise HFError(f"{file}: not a JSON object")
    return hf


def _rope(hf: dict) -> tuple[float, dict | None]:
    """(theta, scaling options) from either layout: `rope_parameters` (transformers ≥ 5) or
    `rope_theta` + `rope_scaling` (earlier)."""
    params = hf.get("rope_parameters") or {}
    scaling = dict(hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if params.get("rope_type") not in (None, "default"):
        scaling = dict(params)
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return theta, None
    if kind == "linear":
        return theta, {"type": "linear", "factor": float(scaling["factor"])}
    if kind == "llama3":
        return theta, {
            "type": "llama3",
            "factor": float(scaling["factor"]),
            "low_freq_factor": float(scaling["low_freq_factor"]),
            "high_freq_factor": float(scaling["high_freq_factor"]),
            "original_max_len": int(scaling["original_max_position_embeddings"]),
        }
    raise HFError(f"config.json: rope scaling {kind!r} is not supported (linear, llama3 are)")


def model_config_from_hf(
    hf: dict[str, Any],
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    max_seq_len: int | None = None,
) -> ModelConfig:
    """The jaxllm `ModelConfig` of a Hugging Face `config.json` (as a dict)."""
    try:
        return _model_config(hf, dtype, param_dtype, max_seq_len)
    except KeyError as e:
        raise HFError(f"config.json: no {e.args[0]!r}") from None
    except ValidationError as e:
        raise HFError(
            f"config.json maps to an invalid model: {config_lib._format_error(e)}"
        ) from None


def _model_config(hf: dict, dtype: str, param_dtype: str, max_seq_len: int | None) -> ModelConfig:
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise HFError(
            f"config.json: model_type {family!r} is not supported; supported: {', '.join(FAMILIES)}"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise HFError(f"config.json: hidden_act {hf['hidden_act']!r} (only silu is supported)")
    if hf.get("mlp_bias"):
        raise HFError("config.json: mlp_bias=true is not supported")
    d, h = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or d // h
    bias = bool(hf.get("attention_bias", False))
    options: dict[str, Any] = {"rope_theta": 10000.0}
    options["rope_theta"], scaling = _rope(hf)
    if scaling:
        options["rope_scaling"] = scaling
    if family == "qwen2" or (family == "qwen2_moe" and hf.get("qkv_bias", True)):
        options["qkv_bias"] = True
    elif bias:
        options.update(qkv_bias=True, out_bias=True)
    if family == "qwen3":
        options["qk_norm"] = True
    limit = int(hf.get("max_position_embeddings", 2048))
    window = hf.get("sliding_window")
    if window and (family in ("mistral", "mixtral") or hf.get("use_sliding_window")):
        # Sliding-window attention equals full causal attention on sequences no longer than
        # the window, so the imported model is exact up to there and refuses to go further.
        limit = min(limit, int(window))
    if max_seq_len is not None:
        if max_seq_len > limit:
            raise HFError(f"max_seq_len={max_seq_len} exceeds the checkpoint's limit of {limit}")
        limit = max_seq_len
    moe = {"mixtral": _moe_options, "qwen2_moe": _qwen2_moe_options}.get(family)
    moe = moe(hf) if moe else {}
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        d_model=d,
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=h,
        n_kv_heads=int(hf.get("num_key_value_heads") or h),
        head_dim=None if head_dim * h == d else int(head_dim),
        d_ff=int(hf["intermediate_size"]),
        mixer="softmax",
        ffn="moe" if family in _MOE_FAMILIES else "swiglu",
        mixers={"softmax": options},
        ffns=moe,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=limit,
        dtype=dtype,
        param_dtype=param_dtype,
    )


def _moe_options(hf: dict) -> dict[str, dict]:
    """Mixtral's sparse block as jaxllm's `moe`: softmax over all experts, the top k
    renormalized (= a softmax over the chosen k), dropless."""
    return {
        "moe": {
            "n_experts": int(hf["num_local_experts"]),
            "top_k": int(hf["num_experts_per_tok"]),
            "router": "softmax",
            "renormalize": True,
            "lb_loss": float(hf.get("router_aux_loss_coef", 0.02)),
        }
    }


def _qwen2_moe_options(hf: dict) -> dict[str, dict]:
    """Qwen2-MoE's sparse block (transformers' Qwen2MoeSparseMoeBlock) as jaxllm's `moe`: a
    float32 softmax over all experts, the top k (renormalized iff `norm_topk_prob`), experts of
    width `moe_intermediate_size`, plus one shared expert of `shared_expert_intermediate_size`
    scaled by sigmoid(x·g). Layer i is a dense MLP of `intermediate_size` when it is in
    `mlp_only_layers` or (i + 1) % `decoder_sparse_step` != 0."""
    n_layers, n_experts = int(hf["num_hidden_layers"]), int(hf["num_experts"])
    if n_experts < 1:
        raise HFError("config.json: qwen2_moe with num_experts=0 (use model_type qwen2)")
    shared = int(hf["shared_expert_intermediate_size"])
    if shared < 1:
        raise HFError(f"config.json: shared_expert_intermediate_size={shared} is not supported")
    step = int(hf.get("decoder_sparse_step", 1))
    mlp_only = {int(i) for i in hf.get("mlp_only_layers") or []}
    dense = [i for i in range(n_layers) if i in mlp_only or (i + 1) % step != 0]
    return {
        "moe": {
            "n_experts": n_experts,
            "top_k": int(hf["num_experts_per_tok"]),
            "router": "softmax",
            "renormalize": bool(hf.get("norm_topk_prob", False)),
            "expert_d_ff": int(hf["moe_intermediate_size"]),
            "n_shared": 1,
            "shared_d_ff": shared,
            "shared_gate": True,
            "dense_layers": dense,
            "lb_loss": float(hf.get("router_aux_loss_coef", 0.001)),
        }
    }


# What a `moe` ffn must look like to be each family's (option: a test of its value, None when
# unset). Options not listed (losses, impl, drop policy) do not change the forward function.
_ALWAYS = {
    "router": lambda v: v in (None, "softmax"),
    "scale": lambda v: v in (None, 1.0),
    "aux_free_rate": lambda v: not v,
    "capacity_factor": lambda v: v is None or v <= 0,
}
_MOE_FORMS = {
    "mixtral": {
        **_ALWAYS,
        "renormalize": lambda v: v in (None, True),
        "n_shared": lambda v: not v,
        "expert_d_ff": lambda v: v is None,
        "dense_layers": lambda v: not v,
    },
    "qwen2_moe": {
        **_ALWAYS,
        "n_shared": lambda v: v == 1,
        "expert_d_ff": lambda v: v is None or isinstance(v, int),
    },
}


# The model fields the Hugging Face families express; any other must keep its default.
_MAPPED_FIELDS = {
    "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "mixer",
    "ffn", "layer_pattern", "mixers", "ffns", "norm_eps", "tie_embeddings", "init_std",
    "max_seq_len", "dtype", "param_dtype",
}  # fmt: skip


def family_of(cfg: ModelConfig) -> str:
    """The Hugging Face family a jaxllm model is written as (`HFError` if none fits)."""
    for name, field in type(cfg).model_fields.items():
        default = field.default if field.default_factory is None else field.default_factory()
        if name not in _MAPPED_FIELDS and getattr(cfg, name) != default:
            raise HFError(f"model.{name}={getattr(cfg, name)!r} has no Hugging Face form")
    if set(cfg.mixer_names()) != {"softmax"} or cfg.ffn not in ("swiglu", "moe"):
        raise HFError(
            f"only softmax attention + swiglu / moe models export to Hugging Face; this one has "
            f"mixers {sorted(set(cfg.mixer_names()))} and ffn {cfg.ffn!r}"
        )
    if cfg.ffn == "moe":
        moe = cfg.ffns.get("moe", {})
        # The sigmoid-gated shared expert is Qwen2-MoE's; without it, Mixtral's block.
        family = "qwen2_moe" if moe.get("shared_gate") else "mixtral"
        for key, ok in _MOE_FORMS[family].items():
            if not ok(moe.get(key)):
                raise HFError(
                    f"model.ffns.moe.{key}={moe.get(key)!r} has no Hugging Face ({family}) form"
                )
        attention = _attention_family(cfg)
        if family == "mixtral" and attention != "llama":
            raise HFError("Mixtral attention has no biases and no qk_norm")
        if family == "qwen2_moe" and attention not in ("llama", "qwen2"):
            raise HFError("Qwen2-MoE attention has no output bias and no qk_norm")
        return family
    return _attention_family(cfg)


def _attention_family(cfg: ModelConfig) -> str:
    options = cfg.mixers.get("softmax", {})
    extra = set(options) - _EXPORTABLE_OPTIONS
    if extra or cfg.ffns.get("swiglu"):
        raise HFError(f"model.mixers.softmax options {sorted(extra)} have no Hugging Face form")
    qkv, out = options.get("qkv_bias", False), options.get("out_bias", False)
    if options.get("qk_norm"):
        if qkv != out:
            raise HFError("qk_norm with qkv_bias != out_bias has no Hugging Face form")
        return "qwen3"
    if qkv and not out:
        return "qwen2"
    if out and not qkv:
        raise HFError("out_bias without qkv_bias has no Hugging Face form")
    return "llama"


def hf_config_from_model(cfg: ModelConfig, *, dtype: str = "float32") -> dict[str, Any]:
    """The `config.json` of a jaxllm model; readable by transformers 4.x and 5.x alike."""
    family = family_of(cfg)
    options = cfg.mixers.get("softmax", {})
    theta = float(options.get("rope_theta", 10000.0))
    scaling = options.get("rope_scaling")
    rope_scaling = None
    if scaling:
        s = dict(scaling)
        rope_scaling = {"rope_type": s["type"], "factor": s["factor"]}
        if s["type"] == "llama3":
            rope_scaling.update(
                low_freq_factor=s.get("low_freq_factor", 1.0),
                high_freq_factor=s.get("high_freq_factor", 4.0),
                original_max_position_embeddings=s.get("original_max_len", 8192),
            )
    hf: dict[str, Any] = {
        "architectures": [_ARCHITECTURE[family]],
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.qk_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": {"rope_theta": theta, "rope_type": "default", **(rope_scaling or {})},
        "torch_dtype": dtype,
    }
    if family in ("llama", "qwen3"):
        hf["attention_bias"] = bool(options.get("qkv_bias", False))
    if family == "llama":
        hf["mlp_bias"] = False
    if family in ("qwen2", "qwen3", "qwen2_moe"):
        hf.update(use_sliding_window=False, sliding_window=None)
    if family == "mixtral":
        moe = cfg.ffns.get("moe", {})
        hf.update(
            num_local_experts=int(moe.get("n_experts", 8)),
            num_experts_per_tok=int(moe.get("top_k", 2)),
            router_aux_loss_coef=float(moe.get("lb_loss", 0.01)),
            sliding_window=None,
        )
    if family == "qwen2_moe":
        moe = cfg.ffns.get("moe", {})
        expert_d_ff = moe.get("expert_d_ff") or cfg.d_ff
        hf.update(
            qkv_bias=bool(options.get("qkv_bias", False)),
            num_experts=int(moe.get("n_experts", 8)),
            num_experts_per_tok=int(moe.get("top_k", 2)),
            norm_topk_prob=bool(moe.get("renormalize", True)),
            moe_intermediate_size=int(expert_d_ff),
            shared_expert_intermediate_size=int(moe.get("shared_d_ff") or expert_d_ff),
            decoder_sparse_step=1,
            mlp_only_layers=sorted({int(i) % cfg.n_layers for i in moe.get("dense_layers", [])}),
            router_aux_loss_coef=float(moe.get("lb_loss", 0.01)),
        )
    return hf


# Model fields a run keeps from its own config when it starts from a Hugging Face checkpoint.
_RUN_FIELDS = ("dtype", "param_dtype", "init_std", "max_seq_len")


def config_for_init(cfg: Config) -> Config:
    """`cfg` with the architecture of its `checkpoint.init_from=hf:PATH` checkpoint: every
    `model.*` field comes from the checkpoint's config.json except `_RUN_FIELDS` (the run's
    choice; `max_seq_len` capped at what the checkpoint supports)."""
    path = (cfg.checkpoint.init_from or "").removeprefix("hf:")
    imported = model_config_from_hf(read_hf_config(path))
    fields = imported.model_dump()
    fields.update({k: getattr(cfg.model, k) for k in _RUN_FIELDS})
    fields["max_seq_len"] = min(cfg.model.max_seq_len, imported.max_seq_len)
    try:
        return Config.model_validate({**cfg.model_dump(), "model": fields})
    except ValidationError as e:
        raise HFError(f"checkpoint.init_from={path}: {config_lib._format_error(e)}") from None
