"""python -m jaxllm.sweep: a 2×2 grid of short runs, its files and the Surge fit on them."""

import csv
import json

import pytest

from jaxllm import sweep

TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=4", "model.n_kv_heads=2",
        "model.d_ff=64", "model.vocab_size=260", "model.max_seq_len=32", "model.dtype=float32",
        "data.seq_len=16", "optim.warmup_steps=1", "train.eval_every=0",
        "train.eval_batches=1"]  # fmt: skip


def test_parse_grid():
    axes, fixed = sweep.parse_grid(["lr=1e-3,3e-3", "batch=8,16", "model.layer_pattern=[a,b]",
                                    "train.steps=5"])  # fmt: skip
    assert axes == [("optim.lr", ["1e-3", "3e-3"]), ("data.batch_size", ["8", "16"])]
    assert fixed == ["model.layer_pattern=[a,b]", "train.steps=5"]


def test_target_and_smoothing():
    curve = sweep.smoothed([(1, 4.0), (2, 2.0), (3, 2.0)], beta=0.5)
    # EMA with bias correction: 4, (0.5·2 + 0.25·... ) — by hand: a1=2/0.5=4, a2=(1+1)/0.75.
    assert curve[0] == (1, 4.0) and curve[1][1] == pytest.approx(2.0 / 0.75)
    runs = [{"curve": [(1, 3.0), (2, 2.0)], "tokens_per_step": 10},
            {"curve": [(1, 3.0), (2, 2.5), (3, 1.0)], "tokens_per_step": 20}]  # fmt: skip
    assert sweep.add_target(runs, None) == 2.0  # the highest best loss: every run reaches it
    assert [r["steps_to_target"] for r in runs] == [2, 3]
    assert [r["tokens_to_target"] for r in runs] == [20, 60]


@pytest.mark.slow
def test_two_by_two_grid_writes_results_and_fits(tmp_path, capsys):
    rc = sweep.main(["default", "lr=3e-3,1e-2", "batch=8,16", *TINY, "--steps", "4",
                     "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == 4
    assert {(r["optim.lr"], r["data.batch_size"]) for r in rows} == {
        ("3e-3", "8"),
        ("3e-3", "16"),
        ("1e-2", "8"),
        ("1e-2", "16"),
    }
    for r in rows:
        assert float(r["final_val_loss"]) < 6.0 and int(r["steps"]) == 4
        assert r["steps_to_target"] != ""  # the default target is reached by every run
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert [b["batch_size"] for b in fit["best"]] == [8, 16]
    # 4 steps say little about B_noise: a fit or a clear reason, never a crash.
    assert "b_noise_tokens" in fit or "error" in fit
    assert "surge fit" in capsys.readouterr().out


def test_bad_override_is_a_clean_error(tmp_path, capsys):
    assert sweep.main(["default", "optim.nope=1,2", "--out", str(tmp_path)]) == 2
    assert "optim.nope" in capsys.readouterr().out
