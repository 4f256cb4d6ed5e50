"""Exceptions raised for bad user input; the CLI prints them as one line and exits with status 2.

:func:`interrupts_as_keyboard` makes SIGTERM stop the program as Ctrl-C does (exit 130).
Standard library only: the CLI uses it before torch is imported.
"""

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["BayesSWSError", "DataError", "FitError", "SpecError", "interrupts_as_keyboard", "one_line"]


class BayesSWSError(Exception):
    """Base class of every error caused by the user's input rather than by a bug."""


class SpecError(BayesSWSError):
    """A model specification is invalid."""


class DataError(BayesSWSError):
    """A dataset is missing, corrupt or unusable."""


class FitError(BayesSWSError):
    """Fitting failed with the given settings (e.g. the loss diverged)."""


@contextlib.contextmanager
def interrupts_as_keyboard() -> Iterator[None]:
    """SIGTERM raises ``KeyboardInterrupt`` inside (as SIGINT does), so both stop a run the same way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def one_line(error: BaseException) -> str:
    """An exception's message on one line (torch's state-dict errors run to several), or its type's name."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
