"""Execute the analysis notebooks: ``python analysis/run.py [--size small|full] [--gallery DIR] [NOTEBOOK ...]``.

Each notebook runs with nbclient in a temporary copy (the stored notebooks stay
free of outputs), with ``analysis/`` as its working directory and a kernel on
this interpreter that imports ``bayes_sws`` from this repository. The
notebooks read two environment variables, which the options set:

- ``BAYES_SWS_NOTEBOOK_SIZE``: ``full`` (real results) or ``small`` (a minute or
  two each, what CI and ``tests/test_notebooks.py`` run);
- ``BAYES_SWS_GALLERY``: a directory where each notebook saves its key figures
  as small PNGs (the README's gallery: ``python analysis/run.py --gallery docs/gallery``).

A failing cell stops its notebook; the command then names the notebook, the
cell and the error, and exits with status 1. Bad arguments (or a missing
``[notebooks]`` extra) give one line and status 2; Ctrl-C stops the notebook's
kernel and exits with status 130. Each kernel is shut down when its notebook ends.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ANALYSIS_DIR = Path(__file__).resolve().parent
REPOSITORY = ANALYSIS_DIR.parent
SIZES = ("small", "full")
CELL_TIMEOUT_S = 1800


class NotebookError(RuntimeError):
    """A notebook cell failed (or timed out); the message names the notebook, the cell and the error."""


def notebooks() -> list[Path]:
    """The stored notebooks, ``analysis/*.ipynb`` in name order."""
    return sorted(ANALYSIS_DIR.glob("*.ipynb"))


def _kernel_manager(kernel_dir: Path):
    """A kernel manager whose one kernel runs ``sys.executable`` (whatever kernels Jupyter has installed)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = kernel_dir / "bayes-sws"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "bayes-sws", "language": "python",
    }))
    return KernelManager(kernel_name="bayes-sws",
                         kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]))


def _failed_cell(notebook) -> tuple[int, str]:
    """Index (among code cells, from 1) and ``ename: evalue`` of the first cell with an error output."""
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    for number, cell in enumerate(code_cells, start=1):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return number, f"{output.get('ename')}: {output.get('evalue')}"
    return 0, "no cell recorded an error"


def execute_notebook(path: str | os.PathLike[str], *, size: str = "full", gallery: str | os.PathLike[str] | None = None,
                     output_dir: str | os.PathLike[str] | None = None, cell_timeout: int = CELL_TIMEOUT_S) -> float:
    """Execute one notebook from a temporary copy; return its wall time in seconds.

    Parameters
    ----------
    path : path-like
        The notebook (``.ipynb``); it is read, never written.
    size : {"small", "full"}
        The notebook's ``SIZE`` (``BAYES_SWS_NOTEBOOK_SIZE``).
    gallery : path-like, optional
        Directory for the key figures (``BAYES_SWS_GALLERY``); created if missing.
    output_dir : path-like, optional
        Keep the executed copy there, under the notebook's name (also when a cell fails).
    cell_timeout : int
        Seconds one cell may run.

    Returns
    -------
    float, the wall time of the execution.

    Raises
    ------
    NotebookError
        If a cell raises or runs past ``cell_timeout``.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    path = Path(path).resolve()
    notebook = nbformat.read(path, as_version=4)
    env = {**os.environ, "BAYES_SWS_NOTEBOOK_SIZE": size, "MPLBACKEND": "module://matplotlib_inline.backend_inline",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))}
    env.pop("BAYES_SWS_GALLERY", None)
    if gallery is not None:
        Path(gallery).mkdir(parents=True, exist_ok=True)
        env["BAYES_SWS_GALLERY"] = str(Path(gallery).resolve())
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bayes-sws-notebook-") as scratch:
        kernel = _kernel_manager(Path(scratch) / "kernels")
        client = NotebookClient(notebook, km=kernel, timeout=cell_timeout,
                                resources={"metadata": {"path": str(path.parent)}})
        # Cell by cell under the plain setup_kernel: NotebookClient.execute traps SIGINT (Ctrl-C did nothing)
        # and leaves a kernel it did not create running; here Ctrl-C raises and the kernel always stops.
        try:
            with client.setup_kernel(env=env, cwd=str(path.parent)):
                for index, cell in enumerate(notebook.cells):
                    client.execute_cell(cell, index)
        except CellTimeoutError as error:
            raise NotebookError(f"{path.name}: a cell ran past {cell_timeout} s: {error}") from None
        except CellExecutionError:
            number, message = _failed_cell(notebook)
            raise NotebookError(f"{path.name}: code cell {number} failed: {message}") from None
        except DeadKernelError as error:
            raise NotebookError(f"{path.name}: the kernel died (out of memory?): {error}") from None
        finally:
            if client.kc is not None:
                client.kc.stop_channels()
            if kernel.has_kernel:
                kernel.shutdown_kernel(now=True)
            if output_dir is not None:
                Path(output_dir).mkdir(parents=True, exist_ok=True)
                nbformat.write(notebook, Path(output_dir) / path.name)
    return time.perf_counter() - started


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return int(text)


def _argument_problem(paths: list[Path], *, directories: tuple[Path | None, ...]) -> str | None:
    """One line naming what is wrong with the arguments (or the installation), or None."""
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        return f"no such notebook: {', '.join(missing)}"
    not_notebooks = [str(p) for p in paths if p.suffix != ".ipynb"]
    if not_notebooks:
        return f"not a notebook (.ipynb): {', '.join(not_notebooks)}"
    files = [str(d) for d in directories if d is not None and d.exists() and not d.is_dir()]
    if files:
        return f"not a directory: {', '.join(files)}"
    for module in ("nbclient", "nbformat", "ipykernel"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed: pip install 'bayes-sws[notebooks]' (or -e '.[notebooks]' in the clone)"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Execute the analysis notebooks (stored copies stay output-free).")
    parser.add_argument("notebooks", nargs="*", type=Path, metavar="NOTEBOOK",
                        help="notebooks to run (default: every analysis/*.ipynb)")
    parser.add_argument("--size", choices=SIZES, default="full", help="full: real results; small: a minute or two")
    parser.add_argument("--gallery", type=Path, help="save the key figures there as small PNGs")
    parser.add_argument("--output-dir", type=Path, help="keep the executed notebooks there")
    parser.add_argument("--cell-timeout", type=_positive_int, default=CELL_TIMEOUT_S, help="seconds one cell may run")
    args = parser.parse_args(argv)
    paths = args.notebooks or notebooks()
    problem = _argument_problem(paths, directories=(args.gallery, args.output_dir))
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    for path in paths:
        try:
            seconds = execute_notebook(path, size=args.size, gallery=args.gallery, output_dir=args.output_dir,
                                       cell_timeout=args.cell_timeout)
        except NotebookError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"interrupted: {path.name} (its kernel was stopped)", file=sys.stderr)
            return 130
        print(f"{path.name}: {seconds:.1f} s ({args.size})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
