"""Numerics of the kernel backends: non-finite input, and the process's floating-point state."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from bayes_sws import kernels
from bayes_sws.prior import GaussianMixture, mixture_log_density, mixture_log_prob_sum

J = 3
N = 1000  # at most one native range: the threads' split is tested in test_kernels.py


def _mixture() -> GaussianMixture:
    return GaussianMixture(torch.tensor([0.6, 0.3, 0.1]).log(), torch.tensor([-0.5, 0.0, 0.5]),
                           torch.tensor([0.2, 0.1, 0.3]))


def _weights() -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, N).reshape(1, N)


def _value_and_grads(weights, mixture):
    """The value, its gradient with respect to the weights and each mixture parameter, and the value alone."""
    leaves = [weights.clone().requires_grad_(), *(t.clone().requires_grad_() for t in mixture)]
    value = mixture_log_prob_sum(leaves[0], GaussianMixture(*leaves[1:]))
    grads = torch.autograd.grad(value.sum(), leaves)
    with torch.no_grad():
        value_only = mixture_log_prob_sum(weights, mixture)
    return value.detach(), grads, value_only


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_weight_gives_nan_value_and_mixture_gradients_on_every_backend(kernel_backend, bad) -> None:
    weights = _weights()
    weights[0, 417] = bad
    value, (grad_w, *mixture_grads), value_only = _value_and_grads(weights, _mixture())
    assert value.isnan().all() and value_only.isnan().all()
    assert grad_w[0, 417].isnan()
    assert torch.cat([grad_w[0, :417], grad_w[0, 418:]]).isfinite().all()
    for grad in mixture_grads:
        assert grad.isnan().all()


MIXTURE_CASES = [
    ("means", math.nan), ("means", math.inf), ("means", -math.inf),
    ("scales", math.nan), ("scales", math.inf), ("scales", 0.0), ("scales", -0.1),
    ("log_proportions", math.nan), ("log_proportions", math.inf),
]


@pytest.mark.parametrize(("field", "bad"), MIXTURE_CASES)
def test_a_non_finite_or_invalid_mixture_parameter_gives_nan_everywhere_on_every_backend(
        kernel_backend, field, bad) -> None:
    mixture = _mixture()
    getattr(mixture, field)[1] = bad
    value, grads, value_only = _value_and_grads(_weights(), mixture)
    assert value.isnan().all() and value_only.isnan().all()
    for grad in grads:
        assert grad.isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_component_with_zero_proportion_is_legitimate_and_stays_finite(kernel_backend, dtype) -> None:
    mixture = GaussianMixture(*(t.to(dtype) for t in _mixture()))
    mixture.log_proportions[1] = -math.inf
    weights = _weights().to(dtype)
    value, grads, value_only = _value_and_grads(weights, mixture)
    for result in (value, value_only, *grads):
        assert result.isfinite().all()
    without = GaussianMixture(*(t[[0, 2]].double() for t in mixture))
    reference = mixture_log_density(weights.double(), without).sum()
    assert float(value[0]) == pytest.approx(float(reference), rel=1e-6)
    assert float(value_only[0]) == pytest.approx(float(reference), rel=1e-6)


FLOAT_STATE_PROBE = """
import json, threading
import numpy as np, torch
from bayes_sws import kernels
from bayes_sws.prior import GaussianMixture, mixture_log_prob_sum
torch.set_num_threads(2)
kernels.set_backend("native")
mixture = GaussianMixture(torch.tensor([-0.7, -0.7]), torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5]))
weights = torch.zeros(1, 100_000, requires_grad=True)
mixture_log_prob_sum(weights, mixture).sum().backward()
tiny = 1e-39  # subnormal in float32
checks = {
    "numpy": bool(np.float32(tiny) * np.float32(1) != 0),
    "torch": bool((torch.tensor([tiny]) * 1 != 0).all()),
    "torch threads": bool((torch.full((1 << 22,), tiny) * 1 != 0).all()),
}
def on_a_thread():
    checks["threading.Thread"] = bool(np.float32(tiny) * np.float32(1) != 0)
thread = threading.Thread(target=on_a_thread)
thread.start()
thread.join()
print(json.dumps(checks))
"""


def test_loading_the_native_kernel_keeps_subnormal_floats_in_the_whole_process(tmp_path) -> None:
    if not kernels.native_available():
        pytest.skip("no C compiler here")
    env = {**os.environ, "BAYES_SWS_CACHE": str(tmp_path / "cache")}
    completed = subprocess.run([sys.executable, "-c", FLOAT_STATE_PROBE], env=env, capture_output=True,
                               text=True, timeout=300, check=True)
    checks = json.loads(completed.stdout.splitlines()[-1])
    assert checks == dict.fromkeys(["numpy", "torch", "torch threads", "threading.Thread"], True)


THREAD_SPLIT = 3 * (1 << 13)  # enough values for the native check to split them over torch's threads


@pytest.mark.parametrize("name", ["torch", "native"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("position", [0, 99, 100, THREAD_SPLIT // 2, THREAD_SPLIT // 2 + 1, THREAD_SPLIT - 1 + 100])
def test_any_nonfinite_finds_one_bad_value_anywhere_among_many_tensors(name, bad, position) -> None:
    if name == "native" and not kernels.native_available():
        pytest.skip("the native kernel cannot be built here (no C compiler)")
    finfo = torch.finfo(torch.float32)
    flat = [torch.full((100,), finfo.max), torch.full((THREAD_SPLIT - 1,), -finfo.max), torch.full((7,), finfo.tiny)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with kernels.use_backend(name):
            assert not kernels.any_nonfinite([t.view(-1, 1) if t.numel() > 7 else t for t in flat])
            index = position
            for tensor in flat:
                if index < tensor.numel():
                    tensor[index] = bad
                    break
                index -= tensor.numel()
            assert kernels.any_nonfinite([t.view(-1, 1) if t.numel() > 7 else t for t in flat])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["torch", "native"])
def test_any_nonfinite_takes_mixed_dtypes_strides_and_empty_input(name) -> None:
    if name == "native" and not kernels.native_available():
        pytest.skip("the native kernel cannot be built here (no C compiler)")
    with kernels.use_backend(name):
        assert not kernels.any_nonfinite([])
        assert not kernels.any_nonfinite([torch.empty(0), torch.tensor([1e300], dtype=torch.float64)])
        strided = torch.zeros(40, 30).t()
        strided[3, 7] = math.nan
        assert kernels.any_nonfinite([torch.zeros(5), strided])
        assert kernels.any_nonfinite([torch.zeros(5), torch.tensor([math.inf], dtype=torch.float64)])
        assert kernels.any_nonfinite([torch.zeros(5), torch.tensor([math.inf], dtype=torch.float16)])
        assert kernels.any_nonfinite([torch.tensor([math.nan], dtype=torch.bfloat16), torch.zeros(5)])
        assert not kernels.any_nonfinite([torch.zeros(1).expand(8), torch.empty(3, device="meta")])
        assert kernels.any_nonfinite([torch.zeros(3), torch.tensor([math.inf]).expand(2, 4)])


@pytest.mark.skipif(not kernels.native_available(), reason="the native kernel cannot be built here (no C compiler)")
@pytest.mark.parametrize("skipping, largest", [(False, 78.0), (True, 20.0)])  # skipping drops terms under e^-24.5
def test_native_float32_responsibilities_are_exact_to_round_off_over_exps_whole_range(skipping, largest) -> None:
    # Two components alike but for π: every weight's minor responsibility is 1 / (1 + e^c),
    # its term exp(-c) for c from 0 to 78 (the dense kernel), so the kernel's exp is all
    # that can err, beyond the round-off of its argument (a few ulp of c).
    native = kernels.backend(torch.zeros(1), 2)
    weights = torch.linspace(-0.5, 0.5, 512)
    eps = torch.finfo(torch.float32).eps
    worst = 0.0
    with kernels.use_skipping(skipping):
        for c in torch.linspace(0.0, largest, 157).tolist():
            log_proportions = torch.tensor([0.0, -c])
            mixture = (log_proportions, torch.zeros(2), torch.ones(2))
            summary = torch.empty(1 + 3 * 2)
            native.value_and_grads([weights], mixture, None, summary)
            c32 = float(-log_proportions[1])
            exact = 1.0 / (1.0 + math.exp(c32))
            error = abs(float(summary[2]) / weights.numel() - exact) / exact
            worst = max(worst, error / ((4 + 2 * c32) * eps))
    assert worst <= 1.0
