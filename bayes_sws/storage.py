"""Files and run directories that appear whole, and checkpoints that survive an interruption.

* :func:`write_atomically`: a file is written under a temporary name in its own
  directory, flushed to disk (``fsync``) and renamed over the target, so readers see
  the old file or the new one, never a part.
* :func:`publish`: a run's artefacts are written into a temporary directory beside
  the output directory and moved into place by a rename; an existing run is only
  replaced when asked (``force``). Replacing takes two renames (old run aside, new
  run in), so the directory holds the old run or the new one, never a mix; between
  the two it is briefly absent.
* :class:`Checkpoint`: after every epoch, the fit's whole state
  (:meth:`~bayes_sws.fitting.FitState.state_dict`) goes atomically to a file in the
  run's *staging directory* ``OUT.partial/`` (beside ``OUT``), which lives as long as
  the run is unfinished and is removed once the results are published.

Any failure (a full disk, a read-only directory, Ctrl-C) removes the temporaries
it leaves and re-raises; writing errors become one-line
:class:`~bayes_sws.errors.BayesSWSError` s.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import BayesSWSError
from .fitting import Callback, FitState

__all__ = ["Checkpoint", "lock_directory", "partial_dir", "publish", "save_tensors", "write_atomically"]


def _fsync_directory(directory: Path) -> None:
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _cannot_write(path: Path, error: OSError) -> BayesSWSError:
    return BayesSWSError(f"cannot write {path}: {error.strerror or error}")


def write_atomically(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Write a file whole: ``write(temporary_path)``, fsync, rename onto ``path``.

    Parameters
    ----------
    path : path-like
        The target; its directory must exist.
    write : callable
        Writes the content to the path it is given.

    Raises
    ------
    BayesSWSError
        If the directory is not writable or the disk is full; no temporary is left.
    """
    path = Path(path)
    try:
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    except OSError as error:
        raise _cannot_write(path, error) from None
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
        _fsync_directory(path.parent)
    except OSError as error:
        raise _cannot_write(path, error) from None
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def save_tensors(path: str | os.PathLike[str], content: dict[str, Any]) -> None:
    """``torch.save`` tensors and plain data atomically (see :func:`write_atomically`)."""
    write_atomically(path, lambda temporary: torch.save(content, temporary))


def partial_dir(out: str | os.PathLike[str]) -> Path:
    """The staging directory of an unfinished run into ``out``: ``out.partial`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def lock_directory(directory: str | os.PathLike[str]) -> int | None:
    """Take an exclusive advisory lock (``flock``) on ``directory`` for this process.

    Returns
    -------
    int or None
        The descriptor holding the lock (``os.close`` it to release); ``None`` where
        the system has no ``flock`` (Windows).

    Raises
    ------
    BayesSWSError
        If another process holds the lock.
    """
    try:
        import fcntl
    except ImportError:
        return None
    handle = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(handle)
        raise BayesSWSError(f"another run is using {directory} now: wait for it to end, "
                            "or give this run another output directory") from None
    return handle


def publish(out: str | os.PathLike[str], write: Callable[[Path], None], *, force: bool = False) -> None:
    """Write a run's artefacts with ``write(directory)`` into a temporary directory, then rename it to ``out``.

    Parameters
    ----------
    out : path-like
        The run directory; its parent must exist.
    write : callable
        Fills the directory it is given.
    force : bool
        Replace an existing ``out``; without it an existing ``out`` that holds
        files is an error (an empty one is taken).

    Raises
    ------
    BayesSWSError
        If ``out`` exists (and not ``force``), or writing fails; ``out`` is then as it
        was and no temporary is left.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise BayesSWSError(f"{out} already holds a run: pass --force (force=True) to replace it")
    try:
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new-"))
    except OSError as error:
        raise _cannot_write(out, error) from None
    try:
        write(staging)
        staging.chmod(0o755)
        if out.exists() and any(out.iterdir()):
            _swap(staging, out)
        else:
            os.replace(staging, out)  # onto nothing, or onto an empty directory
        _fsync_directory(out.parent)
    except OSError as error:
        raise _cannot_write(out, error) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap(new: Path, out: Path) -> None:
    """Put directory ``new`` in the place of directory ``out``; on failure ``out`` is restored."""
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    try:
        os.replace(out, old)  # onto the empty directory just made
    except BaseException:
        old.rmdir()
        raise
    try:
        os.rename(new, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@dataclass
class Checkpoint(Callback):
    """After every epoch, and where SIGINT or SIGTERM stops the fit, save
    ``{**extra, "fit_state": state.state_dict()}`` atomically to ``path``.

    Only the main process writes (see :mod:`bayes_sws.distributed`).
    """

    path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def on_epoch(self, state: FitState, record: dict) -> None:
        self.save(state)

    def on_interrupt(self, state: FitState) -> None:
        self.save(state)

    def save(self, state: FitState) -> None:
        if state.reduction is None or state.reduction.is_main:
            save_tensors(self.path, {**self.extra, "fit_state": state.state_dict()})
