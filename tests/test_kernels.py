"""The kernel backends of bayes_sws.kernels: building the native kernel, threads, fallbacks."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import sys
from pathlib import Path

import pytest
import torch

from bayes_sws import kernels
from bayes_sws.prior import GaussianMixture, mixture_log_density, mixture_log_prob_sum

PROBE = """
import warnings, torch
from bayes_sws import kernels
from bayes_sws.prior import GaussianMixture, mixture_log_prob_sum
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    available = kernels.native_available()
mixture = GaussianMixture(torch.tensor([-0.7, -0.7]), torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5]))
value = float(mixture_log_prob_sum(torch.zeros(1, 10), mixture)[0])
print(available, len(caught), round(value, 6), available and kernels._native().openmp)
"""


def _probe(tmp_path, **environment) -> list[str]:
    env = {**os.environ, "BAYES_SWS_CACHE": str(tmp_path / "cache"), **environment}
    completed = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                               timeout=300, check=True)
    return completed.stdout.split()


def test_native_kernel_is_built_once_into_the_cache(tmp_path) -> None:
    if not kernels.native_available():
        pytest.skip("no C compiler here")
    available, warned, value, _ = _probe(tmp_path)
    assert available == "True" and warned == "0"
    built = list((tmp_path / "cache").glob("sws_kernel-*.so"))
    assert len(built) == 1
    modified = built[0].stat().st_mtime_ns
    assert _probe(tmp_path)[2] == value  # the second process loads the cached library
    assert built[0].stat().st_mtime_ns == modified


def test_without_a_compiler_the_prior_falls_back_to_torch_with_one_warning(tmp_path) -> None:
    available, warned, value, _ = _probe(tmp_path, CC="/nonexistent/cc")
    assert available == "False" and warned == "1"
    # log p(0) = log(0.5 N(0|0,0.25) + 0.5 N(0|1,0.25)) for ten weights, by hand:
    expected = 10 * torch.logsumexp(torch.tensor([-0.7, -0.7]) + torch.distributions.Normal(
        torch.tensor([0.0, 1.0]), 0.5).log_prob(torch.tensor(0.0)), 0)
    assert float(value) == pytest.approx(float(expected), rel=1e-5)


def test_a_compiler_without_openmp_builds_a_one_thread_kernel_with_the_same_result(tmp_path) -> None:
    if not kernels.native_available():
        pytest.skip("no C compiler here")
    compiler = tmp_path / "cc-without-openmp"
    compiler.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\n'
                        f'exec {os.environ.get("CC", "cc")} "$@"\n')
    compiler.chmod(0o755)
    available, warned, value, openmp = _probe(tmp_path, CC=str(compiler))
    assert (available, warned, openmp) == ("True", "0", "False")
    assert value == _probe(tmp_path / "default")[2]


def test_the_cache_key_covers_the_compilers_version(tmp_path) -> None:
    if not kernels.native_available():
        pytest.skip("no C compiler here")
    compiler = tmp_path / "cc"
    for version in ("1", "2"):  # the same path, another compiler behind it
        compiler.write_text(f'#!/bin/sh\n[ "$1" = --version ] && {{ echo "cc {version}"; exit 0; }}\n'
                            f'exec {os.environ.get("CC", "cc")} "$@"\n')
        compiler.chmod(0o755)
        assert _probe(tmp_path, CC=str(compiler))[:2] == ["True", "0"]
    assert len(list((tmp_path / "cache").glob("sws_kernel-*.so"))) == 2


def test_a_cached_library_that_does_not_load_is_rebuilt_with_one_warning(tmp_path) -> None:
    if not kernels.native_available():
        pytest.skip("no C compiler here")
    first = _probe(tmp_path)
    (library,) = (tmp_path / "cache").glob("sws_kernel-*.so")
    library.write_bytes(library.read_bytes()[:100])
    assert _probe(tmp_path) == [first[0], "1", *first[2:]]
    assert _probe(tmp_path) == first  # rebuilt in place: loads without a warning
    assert list((tmp_path / "cache").glob("sws_kernel-*.so")) == [library]


MISSING_SOURCE_PROBE = """
import warnings
from bayes_sws import errors, kernels
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    kernels.native_available()
print(*(str(w.message) for w in caught), sep="\\n")
try:
    kernels.set_backend("native")
except errors.BayesSWSError as error:
    print(error)
"""


def test_without_the_kernel_source_the_warning_and_error_say_it_is_missing(tmp_path) -> None:
    package = Path(kernels.__file__).parent
    shutil.copytree(package, tmp_path / "bayes_sws", ignore=shutil.ignore_patterns("*.c", "__pycache__"))
    env = {**os.environ, "BAYES_SWS_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(tmp_path)}
    lines = subprocess.run([sys.executable, "-c", MISSING_SOURCE_PROBE], env=env, capture_output=True,
                           text=True, timeout=300, check=True, cwd=tmp_path).stdout.splitlines()
    assert len(lines) == 2
    for line in lines:
        assert "sws_kernel.c is missing" in line and "compiler" not in line


def test_a_build_of_an_earlier_kernel_source_loads_without_its_later_functions() -> None:
    # what benchmarks/bench_prior.py --dense-kernel loads: only the mixture functions
    class Symbol:  # stands in for a ctypes function
        pass

    library = type("Library", (), {"sws_mixture_f32": Symbol(), "sws_mixture_f64": Symbol(),
                                   "sws_openmp": staticmethod(lambda: 0)})()
    native = kernels._Native(library)
    assert not native.has_groups(torch.zeros(1)) and native._nonfinite == {}
    assert not native.openmp


def test_native_kernel_threads_are_torchs_own_openmp_threads() -> None:
    if not kernels.native_available() or not kernels._native().openmp:
        pytest.skip("no C compiler with OpenMP here")
    if not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc to list loaded libraries")
    # In a fresh process: other packages (scikit-learn) bring OpenMP runtimes of their own.
    probe = ("from pathlib import Path; from bayes_sws import kernels; kernels.native_available(); "
             "import re; print(*{l.split()[-1] for l in Path('/proc/self/maps').read_text().splitlines() "
             "if re.search(r'lib(g|i)?omp', l)})")
    runtimes = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                              check=True).stdout.split()
    assert len(runtimes) == 1, f"two OpenMP runtimes loaded: {runtimes}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_kernel_gives_the_same_result_on_one_thread_and_on_several(dtype) -> None:
    if not kernels.native_available():
        pytest.skip("no C compiler here")
    generator = torch.Generator().manual_seed(3)
    weights = (torch.randn(1, 100_003, generator=generator) * 0.3).to(dtype)
    mixture = GaussianMixture(torch.log_softmax(torch.randn(7, generator=generator), 0).to(dtype),
                              torch.linspace(-0.5, 0.5, 7, dtype=dtype), torch.full((7,), 0.1, dtype=dtype))
    threads = torch.get_num_threads()
    kernels.set_backend("native")
    try:
        results = []
        for count in (1, 4):
            torch.set_num_threads(count)
            leaves = [weights.clone().requires_grad_(), *(t.clone().requires_grad_() for t in mixture)]
            value = mixture_log_prob_sum(leaves[0], GaussianMixture(*leaves[1:]))
            results.append([value.detach(), *torch.autograd.grad(value.sum(), leaves)])
    finally:
        torch.set_num_threads(threads)
        kernels.set_backend("auto")
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    for single, several in zip(*results):
        torch.testing.assert_close(several, single, rtol=tolerance, atol=tolerance)
    reference = mixture_log_density(weights.double(), GaussianMixture(*(t.double() for t in mixture))).sum()
    assert float(results[0][0]) == pytest.approx(float(reference), rel=tolerance)


def test_tensors_the_native_kernel_cannot_take_go_to_the_torch_kernels() -> None:
    assert kernels.backend(torch.zeros(3, dtype=torch.float16), 4) is kernels._TORCH
    assert kernels.backend(torch.zeros(3), kernels._MAX_NATIVE_COMPONENTS + 1) is kernels._TORCH


def test_unknown_backend_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.set_backend("fortran")


def test_use_backend_scopes_the_choice_to_its_block_and_this_thread() -> None:
    weights = torch.zeros(3)
    default = kernels.backend(weights, 4)
    seen_by_thread = []
    with kernels.use_backend("torch"):
        assert kernels.backend(weights, 4) is kernels._TORCH
        thread = threading.Thread(target=lambda: seen_by_thread.append(kernels.backend(weights, 4)))
        thread.start()
        thread.join()
        with kernels.use_backend("auto"):
            assert kernels.backend(weights, 4) is default
        assert kernels.backend(weights, 4) is kernels._TORCH
    assert seen_by_thread == [default]
    assert kernels.backend(weights, 4) is default


def test_use_backend_restores_the_previous_choice_when_its_block_raises() -> None:
    with pytest.raises(KeyError), kernels.use_backend("compile"):
        assert kernels.backend(torch.zeros(3), 4) is kernels._compiled()
        raise KeyError("inside")
    assert kernels.backend(torch.zeros(3), 4) is not kernels._compiled()
    with pytest.raises(ValueError, match="unknown kernel backend"), kernels.use_backend("fortran"):
        pass


def test_use_backend_overrides_set_backend_inside_its_block() -> None:
    kernels.set_backend("compile")
    try:
        with kernels.use_backend("torch"):
            assert kernels.backend(torch.zeros(3), 4) is kernels._TORCH
        assert kernels.backend(torch.zeros(3), 4) is kernels._compiled()
    finally:
        kernels.set_backend("auto")


def test_an_explicit_native_request_it_cannot_serve_is_an_error_not_a_silent_torch_run():
    if not kernels.native_available():
        pytest.skip("the native kernel cannot be built here")
    from bayes_sws.errors import BayesSWSError

    with kernels.use_backend("native"), pytest.raises(BayesSWSError, match="at most 64 components"):
        kernels.backend(torch.zeros(10), 65)
    with kernels.use_backend("auto"):
        assert kernels.backend(torch.zeros(10), 65) is kernels._TORCH
