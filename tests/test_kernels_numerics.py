"""Numerics of the kernel backends: the process's floating-point state."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bayes_sws import kernels

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
