"""``python -m jaxllm.scaling`` in a subprocess: eval, fit (with a plot), laws, and errors."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _cli(*args, check=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, "-m", "jaxllm.scaling", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_eval_prints_one_row_per_point():
    out = _cli(
        "eval",
        "fp_quant_loss",
        "n_params=1e9",
        "n_tokens=1e11",
        "exponent_bits=8,4,2",
        "mantissa_bits=7,3,1",
        "block_size=128",
    ).stdout.splitlines()
    assert out[0].split() == [
        "n_params",
        "n_tokens",
        "exponent_bits",
        "mantissa_bits",
        "block_size",
        "value",
    ]
    values = [float(line.split()[-1]) for line in out[1:]]
    np.testing.assert_allclose(values, [2.5626, 2.5631, 2.5979], atol=5e-5)


def test_eval_tuple_and_dataclass_results():
    out = _cli("eval", "optimal_exmy", "total_bits=4,8,16").stdout.splitlines()
    assert out[0].split() == ["total_bits", "exponent_bits", "mantissa_bits"]
    assert [line.split()[1:] for line in out[1:]] == [["2", "1"], ["4", "3"], ["8", "7"]]
    out = _cli("eval", "optimal_precision", "compute=1e25").stdout.splitlines()
    assert out[0].split() == ["compute", "precision_bits", "n_params", "n_tokens", "loss"]
    assert 5.0 < float(out[1].split()[1]) < 5.6


def test_laws_lists_arguments():
    out = _cli("laws").stdout
    assert "fp_quant_loss n_params n_tokens exponent_bits mantissa_bits block_size" in out
    assert "surge_optimal_lr batch_size b_noise lr_max" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("eval", "no_such_law"), "unknown law"),
        (("eval", "surge_optimal_lr", "batch_size=1", "b_noise=2", "lr=3"), "unknown ['lr']"),
        (("eval", "surge_optimal_lr", "batch_size=1"), "missing"),
        (("eval", "surge_optimal_lr", "batch_size"), "key=value"),
        (("eval", "optimal_exmy", "total_bits=0"), "total_bits"),
        (("fit", "/nonexistent/runs.csv"), "cannot read"),
    ],
)
def test_errors_exit_2_with_one_line(args, message):
    proc = _cli(*args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_fit_csv_with_plot(tmp_path):
    x = np.geomspace(1e18, 1e21, 9)
    y = 1.8 + 250.0 * x**-0.11
    csv = tmp_path / "runs.csv"
    csv.write_text(
        "flops,loss,note\n" + "".join(f"{float(a)!r},{float(b)!r},r\n" for a, b in zip(x, y))
    )
    png = tmp_path / "fit.png"
    out = _cli("fit", str(csv), "--offset", "--plot", str(png)).stdout
    assert out.startswith("loss vs flops: y = 250")
    assert "x^-0.11 + 1.8" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    no_offset = _cli("fit", str(csv), "--x", "flops", "--y", "loss").stdout
    assert "+ " not in no_offset.split("(")[0]
    bad = _cli("fit", str(csv), "--y", "note", check=False)
    assert bad.returncode == 2 and "must be numbers" in bad.stderr
