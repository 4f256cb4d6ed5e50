"""The analysis notebooks run at their small size (as CI runs them) and are stored without outputs."""

import importlib.util
import os
import signal
import subprocess
import sys
import time
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


def _pid_notebook(path: Path, *, then: str) -> Path:
    """A notebook whose first cell writes its kernel's pid to ``path.with_suffix('.pid')``, then runs ``then``."""
    pid_file = path.with_suffix(".pid")
    nbformat.write(nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(f"import os\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))"),
        nbformat.v4.new_code_cell(then),
    ]), path)
    return pid_file


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("then", ["x = 1", "raise ValueError('broken on purpose')"])
def test_the_kernel_is_stopped_after_its_notebook(tmp_path, then):
    pid_file = _pid_notebook(tmp_path / "pid.ipynb", then=then)
    try:
        run.execute_notebook(tmp_path / "pid.ipynb", size="small")
    except run.NotebookError:
        pass
    assert not _alive(int(pid_file.read_text()))


def test_ctrl_c_stops_the_run_and_its_kernel(tmp_path):
    pid_file = _pid_notebook(tmp_path / "sleep.ipynb", then="import time\ntime.sleep(60)")
    process = subprocess.Popen([sys.executable, str(ANALYSIS / "run.py"), "--size", "small", str(tmp_path / "sleep.ipynb")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130
    assert "interrupted: sleep.ipynb" in stderr.splitlines()[-1]
    assert not _alive(int(pid_file.read_text()))


@pytest.mark.parametrize("arguments, problem", [
    (["README.md"], "not a notebook"), (["missing.ipynb"], "no such notebook"),
    (["--gallery", "README.md", "analysis/01_map_step_by_step.ipynb"], "not a directory"),
])
def test_bad_arguments_give_one_line_and_status_2(arguments, problem, capsys, monkeypatch):
    monkeypatch.chdir(ANALYSIS.parent)
    assert run.main(arguments) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and problem in error
