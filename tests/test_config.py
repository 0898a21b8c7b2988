import subprocess
import sys

import pytest

from jaxllm import choices, config
from jaxllm.config import ConfigError


def test_every_preset_loads():
    names = config.presets()
    assert {"default", "llama-125m", "llama-1b", "llama-7b"} <= set(names)
    for name in names:
        cfg = config.load(name)
        choices.check(cfg)
        assert cfg.name == name


def test_overrides_apply_with_types():
    cfg = config.load(
        "default", ["train.steps=7", "optim.lr=1e-3", "model.tie_embeddings=true",
                    "parallel.mesh.tensor=2", "model.layer_pattern=[softmax, softmax]"]
    )  # fmt: skip
    assert cfg.train.steps == 7 and cfg.optim.lr == 1e-3 and cfg.model.tie_embeddings
    assert cfg.parallel.mesh.tensor == 2
    assert cfg.model.mixer_names() == ["softmax"] * cfg.model.n_layers


def test_round_trip_through_yaml(tmp_path):
    cfg = config.load("default", ["train.steps=3", "model.mixers.softmax.qk_norm=true"])
    path = tmp_path / "c.yaml"
    path.write_text(config.to_yaml(cfg))
    again = config.load(str(path))
    assert again == cfg


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.stepz=3", "unknown key 'train.stepz'; did you mean 'steps'?"),
        ("model.bogus=1", "unknown key 'model.bogus'"),
        ("train.steps=abc", "train.steps"),
        ("train.steps=0", "train.steps: Input should be greater than or equal to 1"),
        ("model.n_heads=7", "n_heads=7 must divide d_model=128"),
        ("model.n_kv_heads=3", "n_kv_heads=3 must divide n_heads=4"),
        ("optim.schedule=step", "optim.schedule"),
        ("train.resume=maybe", "train.resume"),
        ("parallel.mesh.tensor=3", "parallel.mesh.tensor=3 must divide model.n_heads=4"),
        ("parallel.mesh.data=0", "parallel.mesh.data=0"),
        ("steps", "not of the form key.sub=value"),
    ],
)
def test_bad_input_is_one_line_naming_the_field(override, expected):
    with pytest.raises(ConfigError) as err:
        config.load("default", [override])
    msg = str(err.value)
    assert expected in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.mixer=nope", "model.mixer: unknown token mixer 'nope'; known: attn_moe, cla"),
        ("model.layer_pattern=[softmax, nope]", "model.layer_pattern: unknown token mixer 'nope'"),
        ("model.ffn=nope", "model.ffn: unknown channel mixer 'nope'; known: moe, sglu, swiglu"),
        ("model.mixers.nope.x=1", "model.mixers: unknown token mixer 'nope'"),
        ("model.mixers.softmax.qk_nrm=true", "unknown key 'model.mixers.softmax.qk_nrm'"),
        ("model.mixers.lightning.bogus=1", "unknown key 'model.mixers.lightning.bogus'"),
        ("model.ffns.moe.top_k=0", "model.ffns.moe.top_k: Input should be greater than"),
        ("optim.name=nope", "optim.name: unknown optimizer 'nope'; known: adamw, came, lion"),
        ("optim.optimizers.nope.x=1", "optim.optimizers: unknown optimizer 'nope'"),
        ("optim.optimizers.came.eps3=0.9", "unknown key 'optim.optimizers.came.eps3'; did you"),
        ("optim.optimizers.adamw.eps=0", "optim.optimizers.adamw.eps: Input should be greater"),
        ("precision.quantize.x=e9m9", "precision.quantize.x: 'e9m9' is not an ExMy spec"),
    ],
)
def test_a_name_no_registry_holds_is_one_line_naming_the_field(override, expected):
    """The schema takes any name; `choices.check` holds each to its registry."""
    cfg = config.load("default", [override])
    with pytest.raises(ConfigError) as err:
        choices.check(cfg)
    msg = str(err.value)
    assert expected in msg, msg
    assert "\n" not in msg


def test_moved_optimizer_fields_are_unknown_keys():
    for key in ("eps", "b3", "eps1", "eps2", "clip_threshold"):
        with pytest.raises(ConfigError, match=f"unknown key 'optim.{key}'"):
            config.load("default", [f"optim.{key}=0.5"])
    cfg = config.load("default", ["optim.name=came", "optim.optimizers.came.b3=0.999"])
    choices.check(cfg)
    assert cfg.optim.optimizers == {"came": {"b3": 0.999}}


def test_config_imports_no_jaxllm_module_but_the_ground():
    code = "import sys, jaxllm.config; print(*(m for m in sys.modules if m.startswith('jaxllm')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    ground = {"jaxllm", "jaxllm.config", "jaxllm.errors", "jaxllm.parallel"}
    loaded = set(out.stdout.split())
    assert {m for m in loaded - ground if not m.startswith("jaxllm.parallel.core")} == set()


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match="did you mean default"):
        config.load("defualt")


def test_mesh_resolution():
    mesh = config.MeshConfig(fsdp=2)
    assert mesh.resolve(8) == {"data": 4, "fsdp": 2, "tensor": 1}
    with pytest.raises(ConfigError, match="do not divide"):
        config.MeshConfig(fsdp=3).resolve(8)
    with pytest.raises(ConfigError, match="uses 4 devices, but 8"):
        config.MeshConfig(data=2, fsdp=2).resolve(8)
