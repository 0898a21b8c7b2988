import pytest

from jaxllm import config
from jaxllm.config import ConfigError


def test_every_preset_loads():
    names = config.presets()
    assert {"default", "llama-125m", "llama-1b", "llama-7b"} <= set(names)
    for name in names:
        cfg = config.load(name)
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
        ("model.mixer=nope", "unknown token mixer 'nope'"),
        ("model.mixers.softmax.qk_nrm=true", "qk_nrm"),
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
