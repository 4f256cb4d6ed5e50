"""The analysis notebooks run at their small size (as CI runs them) and are stored without outputs."""

import importlib.util
from pathlib import Path

import nbformat
import pytest

from bayes_sws.data import load_dataset
from bayes_sws.errors import DataError

ANALYSIS = Path(__file__).resolve().parent.parent / "analysis"
_spec = importlib.util.spec_from_file_location("analysis_run", ANALYSIS / "run.py")
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)

NOTEBOOKS = run.notebooks()
# Data a notebook needs beyond what every installation has (digits, sunspots).
NEEDS = {"05_compression": "fashion-mnist"}


def _skip_without_its_data(path: Path) -> None:
    if path.stem in NEEDS:
        try:
            load_dataset(NEEDS[path.stem])
        except DataError as error:
            pytest.skip(f"{path.name} needs {NEEDS[path.stem]}: {error}")


def test_there_are_notebooks():
    assert NOTEBOOKS, "analysis/ holds no notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_notebook_has_no_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert 'SIZE = os.environ.get("BAYES_SWS_NOTEBOOK_SIZE", "full")' in code[0].source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_at_small_size(path, tmp_path):
    _skip_without_its_data(path)
    run.execute_notebook(path, size="small", gallery=tmp_path)
    assert list(tmp_path.glob(f"{path.stem}-*.png")), "the notebook saved no gallery figure"


def test_a_failing_cell_names_notebook_cell_and_error(tmp_path):
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import os\nimport bayes_sws\nassert os.environ['BAYES_SWS_NOTEBOOK_SIZE'] == 'small'"),
        nbformat.v4.new_code_cell("raise ValueError('broken on purpose')"),
    ])
    path = tmp_path / "broken.ipynb"
    nbformat.write(notebook, path)
    with pytest.raises(run.NotebookError, match=r"broken\.ipynb: code cell 2 failed: ValueError: broken on purpose"):
        run.execute_notebook(path, size="small", output_dir=tmp_path / "out")
    assert nbformat.read(path, as_version=4).cells[1].outputs == []
    assert nbformat.read(tmp_path / "out" / "broken.ipynb", as_version=4).cells[1].outputs
