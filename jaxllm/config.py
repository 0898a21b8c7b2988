"""The one typed config schema, YAML presets and `key.sub=value` overrides.

A run's config is `Config`: sections `model`, `data`, `optim`, `train`, `parallel`,
`checkpoint`, `logging`. Presets are YAML files in `configs/` (shipped inside the package) holding
deltas over the typed defaults. `load(preset_or_path, overrides)` resolves one; any bad input
raises `ConfigError` with a single line that names the field and what it accepts.

Names a registry holds (token and channel mixers, optimizers, ExMy specs) and their options
are checked by the registries themselves, on a loaded config: `jaxllm.choices.check(cfg)`.
"""

from __future__ import annotations

import difflib
import importlib.resources
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from jaxllm.errors import ConfigError, validation_message
from jaxllm.parallel.core.axes import MESH_AXES
from jaxllm.parallel.core.mesh import resolve_sizes


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------- model


class ModelConfig(Section):
    """The decoder: embedding → n_layers × (norm → mixer → norm → ffn) → norm → head."""

    vocab_size: int = Field(384, ge=2, description="rows of the embedding (≥ tokenizer size)")
    d_model: int = Field(256, ge=1)
    n_layers: int = Field(4, ge=1)
    n_heads: int = Field(8, ge=1)
    n_kv_heads: int | None = Field(None, ge=1, description="GQA kv heads; None = n_heads")
    head_dim: int | None = Field(None, ge=1, description="None = d_model // n_heads")
    d_ff: int = Field(768, ge=1)
    mixer: str = Field("softmax", description="token mixer of every layer (see layer_pattern)")
    ffn: str = Field("swiglu", description="channel mixer of every layer")
    layer_pattern: list[str] | None = Field(
        None, description="token mixer per layer, repeated to n_layers (hybrids)"
    )
    scan_layers: bool = Field(
        False,
        description="run the longest repeating run of layers as one lax.scan over stacked "
        "parameters (compile time and memory flat in depth; the checkpoint layout changes)",
    )
    mixers: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="options of each token mixer, by name"
    )
    ffns: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="options of each channel mixer, by name"
    )
    norm_eps: float = Field(1e-5, gt=0)
    norm: Literal["rms", "srms"] = Field(
        "rms", description="block and final norms: rms (learned scale) | srms (none, TNL)"
    )
    scale_embedding: bool = Field(False, description="multiply the embeddings by √d_model (TNL)")
    tie_embeddings: bool = False
    init_std: float = Field(0.02, gt=0)
    max_seq_len: int = Field(2048, ge=1, description="longest sequence decoding may reach")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="compute dtype"
    )
    param_dtype: Literal["float32", "bfloat16"] = "float32"

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def qk_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def mixer_names(self) -> list[str]:
        """The token mixer of each layer."""
        pattern = self.layer_pattern or [self.mixer]
        return [pattern[i % len(pattern)] for i in range(self.n_layers)]

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must divide d_model={self.d_model} (or set model.head_dim)"
            )
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_kv_heads={self.kv_heads} must divide n_heads={self.n_heads}")
        return self


# ------------------------------------------------------------------------------ data


class DataConfig(Section):
    source: Literal["corpus", "text", "jsonl", "parquet", "arrayrecord"] = Field(
        "corpus",
        description="corpus = the Python standard library's .py files; arrayrecord = a folder "
        "of `python -m jaxllm.data prepare`",
    )
    path: str | None = Field(None, description="file, directory or glob (text / jsonl / parquet)")
    field: str = Field("text", description="jsonl field / parquet column holding the document")
    tokenizer: Literal["bytes", "hf", "sentencepiece"] = Field(
        "bytes", description="bytes | hf (tokenizer.json) | sentencepiece (.model file)"
    )
    tokenizer_path: str | None = Field(
        None, description="file or folder of the hf / sentencepiece tokenizer"
    )
    seq_len: int = Field(256, ge=2)
    batch_size: int = Field(16, ge=1, description="global batch, in sequences")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="documents held out, by hash")
    shuffle: bool = True
    num_threads: int = Field(2, ge=0, description="grain reader threads")
    tokenize_workers: int = Field(
        0, ge=0, description="processes tokenizing the source at start-up (0 = in-process)"
    )
    on_bad_document: Literal["stop", "skip"] = Field(
        "stop",
        description="invalid UTF-8 / JSON, a missing field: stop naming file and line, or skip "
        "and count (empty documents are always skipped and counted)",
    )
    long_documents: Literal["split", "skip", "stop"] = Field(
        "split", description="documents longer than data.seq_len: split over windows, skip, stop"
    )
    domains: dict[str, int] = Field(
        default_factory=dict,
        description="document-key regex → domain id (first match; unmatched = 0); when set, "
        "batches carry a per-token `domain` [B, T] (PanGu-Σ RRE routes by it)",
    )

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.source != "corpus" and not self.path:
            raise ValueError(f"data.path is required with data.source={self.source}")
        for pattern, domain in self.domains.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"data.domains: {pattern!r} is not a valid regex ({e})") from None
            if domain < 0:
                raise ValueError(f"data.domains: domain {domain} of {pattern!r} is negative")
        if self.tokenizer != "bytes" and not self.tokenizer_path:
            raise ValueError(
                f"data.tokenizer_path is required with data.tokenizer={self.tokenizer}"
            )
        return self


# ----------------------------------------------------------------------------- optim


class ParamGroup(Section):
    """Parameters whose path (like "blocks/3/ffn/w_up") matches `pattern` (re.search)."""

    pattern: str = Field(description="regex searched in the parameter path, '/'-joined")
    lr_scale: float = Field(1.0, ge=0, description="multiplies the schedule's learning rate")
    weight_decay: float | None = Field(None, ge=0, description="None = the optimizer's")

    @model_validator(mode="after")
    def _check(self) -> ParamGroup:
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"pattern {self.pattern!r} is not a valid regex ({e})") from None
        return self


class Co2Config(Section):
    """CO2 (arXiv 2401.16265): τ local steps per data-parallel replica, then an outer step
    with a one-round-stale parameter average (see jaxllm.optim.co2).

    Defaults are those our runs support (benchmarks/co2.py; 4 replicas, tiny model, 576 steps,
    synchronous val loss 1.53): restarting the replicas at the outer θ as the official code
    does (carry_local=false) turns a stale average into a delayed update and trained far worse
    (val 2.27/2.22 at τ=4/12 with outer momentum 0, 2.53/2.56/3.83 at τ=4/12/48 with 0.5);
    carry_local=true gave 1.76/1.89/1.91 with outer momentum 0 and 2.04/1.89/1.96 with 0.5.
    Outer momentum 0 is also fairseq-CO2's choice for <= 16 workers (0.2/0.5/0.6 up to
    32/64/more); τ=48 is fairscale-CO2's default."""

    enabled: bool = False
    local_steps: int = Field(48, ge=1, description="τ, inner steps per outer round")
    outer_lr: float = Field(1.0, gt=0)
    outer_momentum: float = Field(
        0.0, ge=0, lt=1, description="β; fairseq-CO2 uses 0.2/0.5/0.6 past 16/32/64 workers"
    )
    staleness_penalty: float = Field(
        1.0, ge=1, description="divides the stale pseudo-gradient (the official code's gap penalty)"
    )
    clip: float | None = Field(None, gt=0, description="clamp the outer momentum to ±clip")
    stale: bool = Field(True, description="False = the current round's average (no overlap)")
    carry_local: bool = Field(
        True,
        description="stale only: each replica restarts at θ plus its own last-round progress "
        "(not yet in the stale average); false = at θ, the official code's reset",
    )


class OptimConfig(Section):
    name: str = Field(
        "adamw", description="a registered optimizer; sgd = momentum SGD (b1), a linear "
        "reference for CO2",
    )  # fmt: skip
    lr: float | None = Field(None, gt=0, description="peak learning rate; None = the optimizer's")
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr / peak lr")
    b1: float = Field(0.9, ge=0, lt=1, description="momentum (Signum's beta, SGD's momentum)")
    b2: float | None = Field(None, ge=0, lt=1, description="None = the optimizer's")
    weight_decay: float | None = Field(
        None, ge=0, description="decoupled, matrices only; None = the optimizer's"
    )
    grad_clip: float | None = Field(1.0, gt=0, description="global-norm clip; None = off")
    optimizers: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="options of each optimizer, by name"
    )
    groups: list[ParamGroup] = Field(
        default_factory=list, description="per-parameter-group lr / decay; first match wins"
    )
    co2: Co2Config = Field(default_factory=Co2Config)


# ----------------------------------------------------------------------------- train


class TrainConfig(Section):
    steps: int = Field(1000, ge=1)
    seed: int = 0
    run_dir: str | None = Field(None, description="default runs/<preset>")
    microbatches: int = Field(1, ge=1, description="gradient accumulation over micro-batches")
    z_loss: float = Field(0.0, ge=0, description="weight of the log(Z)^2 term")
    loss_chunk: int = Field(
        0, ge=0, description="positions per chunk of the output head and the loss: [B, chunk, "
        "V] logits live at once and are recomputed in the backward, not [B, T, V] (0: whole "
        "rows; for large vocabularies at long T)",
    )  # fmt: skip
    eval_every: int = Field(100, ge=0, description="0 = only at the end")
    eval_batches: int = Field(8, ge=1)
    resume: Literal["auto", "never"] = "auto"
    stop_at: int | None = Field(
        None, ge=1, description="pause after this step with a checkpoint (a job's time slot)"
    )
    sample_lines: int = Field(3, ge=0, description="lines sampled at the end of the run")
    sample_tokens: int = Field(120, ge=1)
    remat: Literal["none", "full", "minimal", "save_dots", "offload"] = Field(
        "none", description="activation checkpointing of each block (jaxllm.training.remat)"
    )
    offload_fraction: float = Field(
        0.0, ge=0, le=1, description="remat=offload: share of tokens of the other saved "
        "activations offloaded to host (the rest recomputed)",
    )  # fmt: skip
    optimizer_offload: bool = Field(
        False, description="keep the optimizer state in pinned host memory; the train step "
        "streams it to the device for the update and back (Angel-PTM)",
    )  # fmt: skip


# ------------------------------------------------------------------------- precision


class QuantizeConfig(Section):
    """ExMy fake quantization of each GEMM input of every dense projection (Sun et al. 2025):
    a spec "eEmM[/B|/channel|/tensor]" (e.g. "e4m3/128"; "bf16" = e8m7), or None = high
    precision. Y = X W: x, w; dX = dY W: dy_dx, w_dx; dW = dYᵀ X: dy_dw, x_dw."""

    x: str | None = Field(None, description="P1, forward activation")
    w: str | None = Field(None, description="P2, forward weight")
    dy_dx: str | None = Field(None, description="P3, output gradient in the dX GEMM")
    w_dx: str | None = Field(None, description="P4, weight in the dX GEMM")
    dy_dw: str | None = Field(None, description="P5, output gradient in the dW GEMM")
    x_dw: str | None = Field(None, description="P6, activation in the dW GEMM")


class PrecisionConfig(Section):
    """Low-precision dense projections (jaxllm.precision); embedding, head, norms, routers
    and attention's own products stay in high precision."""

    fp8: Literal["none", "delayed", "current", "blockwise"] = Field(
        "none", description="scaled FP8 projections: E4M3 forward, E5M2 output gradients"
    )
    fp8_level: Literal["O1", "O2"] = Field(
        "O1", description="FP8-LM: O2 also keeps Adam's m in FP8 (scaled) and v in 16 bits"
    )
    fp8_impl: Literal["xla", "pallas"] = Field(
        "xla",
        description="what runs the FP8 GEMMs: XLA's dot_general or the Pallas kernel "
        "(kernels_pallas.fp8_matmul; interpret mode on the CPU)",
    )
    amax_history_len: int = Field(16, ge=1, description="delayed: steps of amax history")
    margin: int = Field(0, ge=0, description="delayed: scale = fp8_max / amax / 2^margin")
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)

    @model_validator(mode="after")
    def _check(self) -> PrecisionConfig:
        if self.fp8 != "none" and any(
            getattr(self.quantize, n) for n in type(self.quantize).model_fields
        ):
            raise ValueError("precision.quantize does not combine with precision.fp8")
        if self.fp8_impl == "pallas" and self.fp8 == "none":
            raise ValueError(
                "precision.fp8_impl=pallas needs precision.fp8 = current, delayed or blockwise"
            )
        return self


# -------------------------------------------------------------------------- parallel


class MeshConfig(Section):
    data: int = Field(-1, description="-1 = the devices left over")
    fsdp: int = 1
    tensor: int = 1
    expert: int = Field(1, description="expert parallelism: routed experts split over it")
    sequence: int = Field(
        1, description="sequence parallelism: the token axis split over it (parallel.sequence_impl)"
    )

    @model_validator(mode="after")
    def _check(self) -> MeshConfig:
        sizes = [getattr(self, a) for a in MESH_AXES]
        if sum(s == -1 for s in sizes) > 1:
            raise ValueError("at most one parallel.mesh axis may be -1")
        for axis, size in zip(MESH_AXES, sizes):
            if size == 0 or size < -1:
                raise ValueError(f"parallel.mesh.{axis}={size}: use a positive size or -1")
        return self

    def resolve(self, n_devices: int) -> dict[str, int]:
        """Axis sizes with -1 filled in; `ConfigError` if they do not tile `n_devices`."""
        try:
            return resolve_sizes({a: getattr(self, a) for a in MESH_AXES}, n_devices)
        except ValueError as e:
            raise ConfigError(str(e)) from None


class ParallelConfig(Section):
    mesh: MeshConfig = Field(default_factory=MeshConfig)
    sequence_impl: Literal["auto", "lasp2", "lasp1", "allgather", "ulysses"] = Field(
        "auto",
        description="with parallel.mesh.sequence > 1: lasp2 | lasp1 for linear mixers, "
        "allgather | ulysses for softmax; auto = lasp2 / allgather (jaxllm.parallel.sequence)",
    )


# ------------------------------------------------------------------ checkpoint, logs


class CheckpointConfig(Section):
    every: int = Field(500, ge=0, description="0 = only at the end")
    keep: int = Field(3, ge=1)
    async_save: bool = True
    init_from: str | None = Field(
        None,
        description="hf:PATH = start from a Hugging Face folder (its architecture replaces "
        "model.*, except dtype, param_dtype, init_std, max_seq_len)",
    )

    @model_validator(mode="after")
    def _check(self) -> CheckpointConfig:
        if self.init_from is not None and not (
            self.init_from.startswith("hf:") and len(self.init_from) > 3
        ):
            raise ValueError(
                f"checkpoint.init_from={self.init_from!r}: use hf:PATH (a Hugging Face folder)"
            )
        return self


class LoggingConfig(Section):
    every: int = Field(10, ge=1)
    progress: Literal["auto", "bar", "lines"] = "auto"
    tensorboard: bool = True
    plot: bool = True


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    precision: PrecisionConfig = Field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    name: str = Field("run", description="preset name; names the default run folder")

    @model_validator(mode="after")
    def _check(self) -> Config:
        m, d = self.model, self.data
        if d.batch_size % self.train.microbatches:
            raise ValueError(
                f"train.microbatches={self.train.microbatches} must divide "
                f"data.batch_size={d.batch_size}"
            )
        if m.max_seq_len < d.seq_len:
            raise ValueError(
                f"model.max_seq_len={m.max_seq_len} must be ≥ data.seq_len={d.seq_len}"
            )
        co2 = self.optim.co2
        if co2.enabled:
            tau, t = co2.local_steps, self.train
            for what, n in (("train.steps", t.steps), ("train.stop_at", t.stop_at or tau)):
                if n % tau:
                    raise ValueError(
                        f"optim.co2.local_steps={tau} must divide {what}={n} (a call is a round)"
                    )
            if t.microbatches != 1:
                raise ValueError("optim.co2 does not combine with train.microbatches > 1")
            if getattr(getattr(self, "precision", None), "fp8", None) == "delayed":
                raise ValueError("optim.co2 does not combine with precision.fp8=delayed")
        moe = m.ffns.get("moe", {}) if m.ffn == "moe" else {}
        if d.domains and moe.get("router") == "hash":
            n = moe.get("n_domains", 1)
            if max(d.domains.values()) >= n:
                raise ValueError(
                    f"data.domains names domain {max(d.domains.values())}: the hash router has "
                    f"model.ffns.moe.n_domains={n}"
                )
        if self.parallel.mesh.tensor > 1:
            t = self.parallel.mesh.tensor
            for what, n in (("n_heads", m.n_heads), ("n_kv_heads", m.kv_heads), ("d_ff", m.d_ff)):
                if n % t:
                    raise ValueError(f"parallel.mesh.tensor={t} must divide model.{what}={n}")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.train.run_dir or f"runs/{self.name}")


# ------------------------------------------------------------------------- loading


def configs_dir() -> Path:
    """The folder of presets shipped with the package (works from a wheel too)."""
    return Path(str(importlib.resources.files("jaxllm") / "configs"))


def presets() -> list[str]:
    return sorted(p.stem for p in configs_dir().glob("*.yaml"))


def _read_yaml(preset_or_path: str) -> tuple[str, dict]:
    path = Path(preset_or_path)
    if not (path.suffix in (".yaml", ".yml") or path.exists()):
        path = configs_dir() / f"{preset_or_path}.yaml"
        if not path.exists():
            close = difflib.get_close_matches(preset_or_path, presets(), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(
                f"unknown preset {preset_or_path!r}{hint}; presets: {', '.join(presets())}"
            )
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config is a mapping of sections")
    base = data.pop("base", None)
    if base:
        _, parent = _read_yaml(base)
        data = _merge(parent, data)
    return path.stem, data


def _merge(base: dict, delta: dict) -> dict:
    out = dict(base)
    for key, value in delta.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[path[-1]] = value


def load(preset_or_path: str = "default", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Resolve a preset name or YAML path plus `key.sub=value` overrides into a `Config`."""
    name, data = _read_yaml(preset_or_path)
    data.setdefault("name", name)
    for item in overrides:
        path, value = _parse_override(item)
        _set(data, path, value)
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(validation_message(err, Config)) from None


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def keys(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, type, description) of every settable key, for `--help`."""
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += keys(ann, f"{prefix}{name}.")
        else:
            t = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
            default = field.default if field.default_factory is None else field.default_factory()
            out.append((f"{prefix}{name}", f"{t} = {default!r}", field.description or ""))
    return out
