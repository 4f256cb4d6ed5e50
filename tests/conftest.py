"""Shared fixtures."""

import signal

import pytest

from bayes_sws import kernels

# A test run started in the background by a non-interactive shell (``pytest &``) inherits
# SIGINT ignored, and so would every process it starts; the Ctrl-C tests need Python's own
# handler.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(params=["torch", "native", "compile"])
def kernel_backend(request):
    """Run a test once per way of computing the prior (bayes_sws.kernels), then restore "auto"."""
    if request.param == "native" and not kernels.native_available():
        pytest.skip("the native kernel cannot be built here (no C compiler)")
    kernels.set_backend(request.param)
    yield request.param
    kernels.set_backend("auto")
