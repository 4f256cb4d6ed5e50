"""Shared fixtures."""

import pytest

from bayes_sws import kernels


@pytest.fixture(params=["torch", "native", "compile"])
def kernel_backend(request):
    """Run a test once per way of computing the prior (bayes_sws.kernels), then restore "auto"."""
    if request.param == "native" and not kernels.native_available():
        pytest.skip("the native kernel cannot be built here (no C compiler)")
    kernels.set_backend(request.param)
    yield request.param
    kernels.set_backend("auto")
