"""The committed notebooks: valid, without outputs, and parameterisable by papermill."""

from __future__ import annotations

import warnings
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks_to_check():
    assert len(NOTEBOOKS) >= 7, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_a_notebook_is_committed_valid_and_without_outputs(path):
    with warnings.catch_warnings():
        # A cell without an id is a warning today and an error in later nbformat versions.
        warnings.simplefilter("error")
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert not [i for i, c in enumerate(code) if c.outputs or c.execution_count is not None], \
        f"{path.name}: cells with outputs; clear them before committing"
    ids = [c.get("id") for c in notebook.cells]
    assert all(ids) and len(set(ids)) == len(ids), f"{path.name}: cell ids missing or repeated"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: papermill needs exactly one cell tagged 'parameters', found {len(tagged)}"
