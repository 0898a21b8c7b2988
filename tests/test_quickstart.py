"""examples/quickstart.ipynb: its code cells are valid Python, and (slow) they all run, in order,
on the CPU — the notebook's own cells are executed, so the test cannot drift from it. The
Hugging Face cell imports the frozen test checkpoint instead of downloading one."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).parents[1] / "examples" / "quickstart.ipynb"
HF_FIXTURE = Path(__file__).parent / "interop" / "fixtures" / "llama_bf16"


def _code_cells() -> list[str]:
    nb = json.loads(NOTEBOOK.read_text())
    assert nb["nbformat"] == 4
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_notebook_cells_are_python():
    cells = _code_cells()
    assert len(cells) >= 6
    for source in cells:
        ast.parse(source)


@pytest.mark.slow
def test_notebook_runs_on_the_cpu(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(os.environ, "JAXLLM_HF_DIR", str(HF_FIXTURE))
    namespace: dict = {"__name__": "__main__"}
    for i, source in enumerate(_code_cells()):
        exec(compile(source, f"{NOTEBOOK.name}[cell {i}]", "exec"), namespace)
    assert namespace["summary"]["val_loss"] < 5.0
    assert namespace["logits"].shape == (1, 4, 260)
