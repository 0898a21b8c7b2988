"""Training and sampling from an imported Hugging Face checkpoint (`checkpoint.init_from`,
`python -m jaxllm.generate --hf`)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jaxllm import config
from jaxllm.convert import main as convert_main
from jaxllm.data import Pipeline
from jaxllm.generate import main as generate_main
from jaxllm.interop import hf
from jaxllm.training.loop import train
from jaxllm.training.step import cross_entropy
from tests.helpers import tiny

LLAMA = Path(__file__).parent / "fixtures" / "llama_bf16"


def test_init_from_rejects_other_schemes():
    with pytest.raises(config.ConfigError, match="use hf:PATH"):
        tiny("checkpoint.init_from=/some/where")


def test_config_for_init_takes_the_architecture_and_keeps_the_run_fields():
    cfg = hf.config_for_init(tiny(f"checkpoint.init_from=hf:{LLAMA}", "model.max_seq_len=48"))
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.d_ff) == (16, 2, 24)
    assert cfg.model.vocab_size == 260 and not cfg.model.tie_embeddings
    assert cfg.model.dtype == "float32" and cfg.model.max_seq_len == 48
    assert cfg.model.mixers["softmax"]["rope_scaling"]["type"] == "llama3"


def test_training_starts_from_the_imported_weights(tmp_path):
    # A learning rate of 1e-9 moves no weight by more than ~1e-9 in the one step, so the run's
    # checkpoint must hold the imported weights (within 1e-6) and the reported first loss is
    # that of the imported model on the first batch.
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(24):
        (docs / f"{i}.txt").write_text(f"document {i}: " + "the quick brown fox " * (i + 3))
    cfg = tiny(
        "data.source=text", f"data.path={docs}", "data.val_fraction=0.3",
        f"checkpoint.init_from=hf:{LLAMA}", "train.steps=1", "optim.lr=1e-9",
        "optim.warmup_steps=0", "optim.weight_decay=0", "train.eval_every=0",
        f"train.run_dir={tmp_path / 'run'}", "logging.every=1",
    )  # fmt: skip
    summary = train(cfg)
    assert summary["step"] == 1
    imported = hf.load_params(LLAMA, hf.config_for_init(cfg).model)
    mngr = ocp.CheckpointManager(tmp_path / "run" / "checkpoints")
    saved = mngr.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    mngr.close()
    # Orbax gives the block indices back as strings; both flatten in the same order.
    leaves = zip(jax.tree.leaves(saved["state"]["params"]), jax.tree.leaves(imported), strict=True)
    for a, b in leaves:
        np.testing.assert_allclose(a, np.asarray(b), atol=1e-6, rtol=0)
    written = config.load(str(tmp_path / "run" / "config.yaml"))
    assert written.model.d_model == 16 and written.checkpoint.init_from == f"hf:{LLAMA}"
    # The first reported loss is the imported model's, computed here independently on the
    # pipeline's first batch.
    model, _ = hf.load_pretrained(LLAMA)
    batch = next(Pipeline(cfg.data, seed=cfg.train.seed).train_iterator())
    logits = model(batch["inputs"], positions_BT=batch["positions"],
                   segment_ids_BT=batch["segment_ids"])  # fmt: skip
    nll, _ = cross_entropy(logits, batch["targets"], batch["loss_mask"])
    want = float(nll) / float(np.sum(batch["loss_mask"]))
    first = next(r["loss"] for r in summary["records"] if "loss" in r)
    np.testing.assert_allclose(first, want, rtol=1e-5)

    # Handing the trained model back: the run's checkpoint as a Hugging Face folder.
    out = tmp_path / "hf_out"
    assert convert_main(["export", str(tmp_path / "run"), str(out), "--dtype", "float32"]) == 0
    exported, exported_cfg = hf.load_pretrained(out)
    assert exported_cfg.model_dump() == hf.config_for_init(cfg).model.model_dump()
    for a, b in zip(jax.tree.leaves(saved["state"]["params"]),
                    jax.tree.leaves(nnx.to_pure_dict(nnx.state(exported, nnx.Param)))):  # fmt: skip
        np.testing.assert_array_equal(a, np.asarray(b))


def test_generate_from_a_hugging_face_folder(capsys):
    rc = generate_main(
        ["--hf", str(LLAMA), "--tokenizer", "bytes", "--prompt", "ab", "--max-new-tokens", "5",
         "--temperature", "0"]
    )  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert out.out.startswith("ab")


def test_generate_needs_a_run_or_a_folder(capsys):
    assert generate_main([]) == 2
    assert "give a run folder or --hf PATH" in capsys.readouterr().err
