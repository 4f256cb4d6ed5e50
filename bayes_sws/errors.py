"""Exceptions raised for bad user input; the CLI prints them as one line and exits with status 2."""

__all__ = ["BayesSWSError", "DataError", "FitError", "SpecError"]


class BayesSWSError(Exception):
    """Base class of every error caused by the user's input rather than by a bug."""


class SpecError(BayesSWSError):
    """A model specification is invalid."""


class DataError(BayesSWSError):
    """A dataset is missing, corrupt or unusable."""


class FitError(BayesSWSError):
    """Fitting failed with the given settings (e.g. the loss diverged)."""
