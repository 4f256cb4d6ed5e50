"""The mixture prior's hot loop: value and analytic gradients over a row of weights.

Three backends compute the same quantities for one row of N weights (given as one
or several segments, e.g. the weight tensors of one mixture group, read in place)
and a J-component mixture: the value Σ_i log p(w_i), its gradient with
respect to each weight, −Σ_j γ_ij d_ij/σ_j², and with respect to the mixture,
Σ_i γ_ij (log π_j), Σ_i γ_ij d_ij/σ_j² (μ_j) and Σ_i γ_ij (d_ij²/σ_j² − 1)/σ_j (σ_j),
with responsibilities γ and d = w − μ.

* ``"torch"``: chunks of weights through torch ops (CPU or CUDA), O(chunk·J)
  temporaries per chunk;
* ``"compile"``: the same chunk function through ``torch.compile`` (dynamic
  shapes, one graph for every layer), CPU or CUDA;
* ``"native"``: a small C kernel (``sws_kernel.c``) built with the system's C
  compiler on first use and cached, CPU only, one pass with an L1-resident block
  table, split over ``torch.get_num_threads()`` OpenMP threads (one thread where the
  compiler has no OpenMP).

``"auto"`` (the default) takes ``"native"`` for CPU tensors where it builds and
``"torch"`` elsewhere. Select with :func:`set_backend` for the whole process, or
with :func:`use_backend` for a block of code.

The native kernel also has a group function (:func:`group_backend`, a
:class:`GroupPlan` from :func:`group_plan`): one mixture group's whole MAP prior term
at a point, λ·Σ log p(w | mixture) + log p(mixture), in one call from the sites'
unconstrained coordinates, with the weights' gradients (scaled by λ in the pass) and
the coordinates'. ``prior.SoftWeightSharingPrior.group_log_joint`` takes it on the
CPU; elsewhere it composes the same from torch ops and :func:`backend`.

Every backend answers non-finite input the same way: a NaN or infinite weight makes
the value, the mixture gradients and that weight's gradient NaN; a mean that is NaN
or infinite, a scale that is NaN, infinite, zero or negative, or a log-proportion
that is NaN or +inf makes the value and every gradient NaN. A log-proportion of −inf
(a component with π = 0) is legitimate and gives finite results.

Skipping, exact to round-off (native backend). For each block of weights in
[lo, hi] the kernel bounds every component's log-density term
v_j(w) = log π_j − log σ_j − log(2π)/2 − (w − μ_j)²/(2σ_j²) over the block: best_j
(at the point of [lo, hi] nearest μ_j) and worst_j (at the end farthest from it).
Each weight's top term is at least floor = max_j worst_j, so a component with
best_j < floor − margin has γ_ij < exp(−margin) for every weight of the block and is
not evaluated; each weight's top component always is. The margin
(:func:`skip_margin`) is ln(1/u) + ln J + 5 nats, u the dtype's unit round-off
(2⁻²⁴ float32, 2⁻⁵³ float64): the at most J skipped terms change a weight's density
by less than u·e⁻⁵ of it. Their terms in the gradients, γ_ij·|d_ij|/σ_j² and
γ_ij·|d_ij²/σ_j² − 1|/σ_j, are at most γ_ij·(1 + z²)/σ_j with z = d/σ_j, which for a
narrow component just past a block can be σ_k/σ_j·(1 + z²) ≈ 10⁴·70 times a kept
component k's: so a component's bound is raised by
ln max(1, σ_widest/σ_j·max(2, 1 + z_near²)), σ_widest the largest scale among the
components that can be a weight's top (best_j ≥ floor) and z_near the block's nearest
z. Each skipped term of every gradient is then below e^(−margin)/σ_widest: at most
the fraction e^(−margin) of the gradient of a weight one σ from its top component, as
each skipped responsibility is of one. For float32 and J = 17 the margin is 24.5
nats, for float64 44.6. Blocks holding a non-finite weight are evaluated densely, so
the rules above hold unchanged. :func:`use_skipping` turns it off (the dense kernel,
for tests and benchmarks); the torch backends always evaluate every pair.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import math
import os
import platform
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from .errors import BayesSWSError

__all__ = ["BACKENDS", "GroupPlan", "any_nonfinite", "backend", "current_backend", "group_backend", "group_plan", "native_available",
           "set_backend", "skip_margin", "skipping", "use_backend", "use_skipping"]

BACKENDS = ("auto", "torch", "compile", "native")
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
# exp() of anything below this is a subnormal float32; clamping keeps the kernel at
# full speed when precisions grow large, and changes sums by < 1e-33.
_MIN_LOG_RATIO = -80.0
_SOURCE = Path(__file__).with_name("sws_kernel.c")
_MAX_NATIVE_COMPONENTS = 64
_MIN_WEIGHTS_PER_THREAD = 1 << 13
_MAX_NATIVE_PARTS = 256  # MAX_PARTS in sws_kernel.c
_GROUP_SUFFIXES = ("means", "precisions", "pi", "pi_zero")  # the order sws_mixture_*_joint takes them
# Nats beyond ln(1/u) + ln J in the skipping bound (see the module's docstring).
_SKIP_SAFETY = 5.0


# --------------------------------------------------------------------------- torch


def _chunk_log_components(weights: torch.Tensor, log_proportions: torch.Tensor, means: torch.Tensor,
                          scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log π_j N(w_i|μ_j,σ_j²) laid out ``(J, C)`` (contiguous along weights), with d = w − μ and 1/σ².

    A component whose mean is not finite, whose scale is not finite and positive, or
    whose log-proportion is NaN or +inf has a NaN row (see the module's docstring).
    """
    precisions = scales.pow(-2).unsqueeze(1)
    log_scales = scales.log()
    # A select, not x * 0: torch.compile folds x * 0 to 0 even for infinite x.
    valid = means.isfinite() & (scales > 0) & (scales < math.inf) & (log_proportions < math.inf)
    poison = torch.where(valid, 0.0, math.nan).to(means.dtype)
    log_norm = (log_proportions - log_scales - HALF_LOG_2PI + poison).unsqueeze(1)
    diff = weights.unsqueeze(0) - means.unsqueeze(1)
    return log_norm - 0.5 * diff * diff * precisions, diff, precisions


def _chunk_value(weights: torch.Tensor, log_proportions: torch.Tensor, means: torch.Tensor,
                 scales: torch.Tensor) -> torch.Tensor:
    """Σ_i log p(w_i) over one chunk; ``weights`` (C,), parameters (J,)."""
    log_comp, _, _ = _chunk_log_components(weights, log_proportions, means, scales)
    # logsumexp gives −inf for an infinite weight; w − w makes it NaN, as the gradient path does
    return torch.logsumexp(log_comp, dim=0).sum() + (weights - weights).sum()


def _chunk_value_and_grads(weights: torch.Tensor, log_proportions: torch.Tensor, means: torch.Tensor,
                           scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's log-density sum with its analytic gradients.

    Returns ``(grad_weights (C,), summary (1 + 3J,))``: the summary packs the
    chunk's Σ log p(w_i), then Σγ, Σγ·d and Σγ·d² (each (J,)), with d = w − μ.
    """
    log_comp, diff, precisions = _chunk_log_components(weights, log_proportions, means, scales)
    top = log_comp.amax(dim=0)
    unnormalised = torch.exp((log_comp - top).clamp_min(_MIN_LOG_RATIO))
    total = unnormalised.sum(dim=0)
    value = (top + total.log()).sum()
    gamma = unnormalised / total
    gamma_diff = gamma * diff
    grad_weights = -(gamma_diff * precisions).sum(dim=0)
    summary = torch.cat([value.reshape(1), gamma.sum(dim=1), gamma_diff.sum(dim=1), (gamma_diff * diff).sum(dim=1)])
    return grad_weights, summary


def _mixture_gradients(sums: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(value, Σγ, Σγd, Σγd²) → (value, ∂/∂log π, ∂/∂μ, ∂/∂σ), each part (J,) after the value."""
    counts, first, second = sums[1:].view(3, -1)
    precisions = scales.pow(-2)
    return torch.cat([sums[:1], counts, first * precisions, (second * precisions - counts) / scales])


class _ChunkedTorch(NamedTuple):
    """Row functions built from chunk kernels, at the chunk lengths they run fastest at."""

    value_kernel: Callable
    grad_kernel: Callable
    cpu_chunk: int
    cuda_chunk: int

    def _chunks(self, segments: Sequence[torch.Tensor], chunk_size: int | None) -> int:
        default = self.cuda_chunk if segments[0].is_cuda else self.cpu_chunk
        return max(1, min(chunk_size or default, max(t.numel() for t in segments)))

    def value_and_grads(self, segments, mixture, grad_outs, summary_out, *, chunk_size=None) -> None:
        size = self._chunks(segments, chunk_size)
        pieces = []  # (chunk, its gradient's buffer or None: grad_outs None skips keeping the weights' gradients)
        for weights, grad_out in zip(segments, grad_outs or [None] * len(segments)):
            chunks = weights.reshape(-1).split(size)
            pieces += zip(chunks, [None] * len(chunks) if grad_out is None else grad_out.view(-1).split(size))
        # Chunk results are copied into buffers allocated up front: keeping per-chunk
        # tensors alive between the chunks' large temporaries fragments the heap.
        summaries = segments[0].new_empty(len(pieces), 1 + 3 * mixture[0].numel())
        for (chunk, chunk_grad), chunk_summary in zip(pieces, summaries):
            grad, summary = self.grad_kernel(chunk, *mixture)
            if chunk_grad is not None:
                chunk_grad.copy_(grad)
            chunk_summary.copy_(summary)
        summary_out.copy_(_mixture_gradients(summaries.sum(0), mixture[2]))

    def value(self, segments, mixture, *, chunk_size=None) -> torch.Tensor:
        size = self._chunks(segments, chunk_size)
        chunks = [chunk for weights in segments for chunk in weights.reshape(-1).split(size)]
        values = segments[0].new_empty(len(chunks))
        for chunk, slot in zip(chunks, values):
            slot.copy_(self.value_kernel(chunk, *mixture))
        return values.sum()


# Eager kernels materialise a few (J, C) temporaries per chunk: small chunks keep them
# in cache on CPU. Compiled kernels fuse them away and pay a per-call overhead.
_TORCH = _ChunkedTorch(_chunk_value, _chunk_value_and_grads, cpu_chunk=1 << 12, cuda_chunk=1 << 18)


@functools.cache
def _compiled() -> _ChunkedTorch:
    return _ChunkedTorch(
        torch.compile(_chunk_value, dynamic=True),
        torch.compile(_chunk_value_and_grads, dynamic=True),
        cpu_chunk=1 << 16,
        cuda_chunk=1 << 20,
    )


# --------------------------------------------------------------------------- skipping

_SKIPPING: contextvars.ContextVar[bool] = contextvars.ContextVar("bayes_sws_kernel_skipping", default=True)


def skip_margin(dtype: torch.dtype, components: int) -> float:
    """The native kernel's skipping margin in nats: ln(1/u) + ln J + 5, u the unit round-off of ``dtype``.

    Parameters
    ----------
    dtype : torch.dtype
        The weights' floating-point type.
    components : int
        J, the mixture's number of components.

    Returns
    -------
    float
        A component whose best log-density over a block of weights, raised by its
        gradient factor, lies more than this under the block's floor is skipped for that
        block (see the module's docstring).
    """
    unit_round_off = torch.finfo(dtype).eps / 2
    return -math.log(unit_round_off) + math.log(components) + _SKIP_SAFETY


def skipping() -> bool:
    """Whether the native kernel skips components that cannot matter (the default), here."""
    return _SKIPPING.get()


@contextlib.contextmanager
def use_skipping(enabled: bool) -> Iterator[None]:
    """Let the native kernel skip components (``True``, the default) or evaluate every pair, in this block.

    Both give the same value and gradients to round-off; the dense form is there to
    check that, and to time it. A context variable, like :func:`use_backend`.

    Parameters
    ----------
    enabled : bool
        ``False`` evaluates every (weight, component) pair.
    """
    token = _SKIPPING.set(bool(enabled))
    try:
        yield
    finally:
        _SKIPPING.reset(token)


# --------------------------------------------------------------------------- native


def _cpu_signature() -> str:
    """Distinguishes machines whose CPUs differ (the kernel is built with -march=native)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = os.uname().machine
    return hashlib.sha256(flags.encode()).hexdigest()[:12]


def _cache_dir() -> Path:
    root = os.environ.get("BAYES_SWS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bayes_sws"
    )
    return Path(root)


class GroupPlan(NamedTuple):
    """A mixture group's closed-form configuration for :meth:`_Native.group_value_and_grads`.

    Plain numbers only, so a prior that caches one still pickles and deep-copies; the C
    struct (``sws_group_plan``) is built from it where it is used (:func:`_group_struct`).
    """

    components: int
    zero_component: bool
    suffixes: tuple[str, ...]  # the coordinates, in the order the gradients come back
    fixed_pi_zero: float | None
    constant: float
    means_precision: float
    gamma_shape_minus_one: tuple[float, ...] | None
    gamma_rate: tuple[float, ...] | None
    dirichlet_minus_one: tuple[float, ...] | None
    beta_minus_one: tuple[float, float] | None


class _GroupPlanStruct(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in ("components", "zero_component", "has_means", "has_pi",
                                                  "has_pi_zero", "fixed_pi_zero")] \
        + [(name, ctypes.c_double) for name in ("log_pi_zero", "log1m_pi_zero", "constant", "means_precision")] \
        + [(name, ctypes.c_void_p) for name in ("gamma_shape_minus_one", "gamma_rate", "dirichlet_minus_one",
                                                "beta_minus_one")]


_ARRAY_FIELDS = ("gamma_shape_minus_one", "gamma_rate", "dirichlet_minus_one", "beta_minus_one")


def group_plan(*, components: int, zero_component: bool, suffixes: Sequence[str], fixed_pi_zero: float | None,
               constant: float, means_precision: float, gamma: tuple[torch.Tensor, torch.Tensor] | None,
               dirichlet: torch.Tensor | None, beta: tuple[torch.Tensor, torch.Tensor] | None) -> GroupPlan:
    """A group's closed-form plan (``prior._PointPlan``) for the native group function; ``None``: a flat hyperprior.

    Parameters
    ----------
    components : int
        J.
    zero_component : bool
    suffixes : sequence of str
        The group's sites among ``means``, ``precisions`` (required), ``pi``, ``pi_zero``.
    fixed_pi_zero : float or None
        π0 where it is fixed (a zero component, J > 1 and no ``pi_zero`` site).
    constant, means_precision : float
        log p(sites)'s constant, and 1/s² of the means' Normal(0, s) (0: flat).
    gamma : (Tensor (J,), Tensor (J,)) or None
        α − 1 and β of the precisions' Gamma.
    dirichlet : Tensor (K,) or None
        a − 1 of π's Dirichlet.
    beta : (Tensor (), Tensor ()) or None
        a − 1 and b − 1 of π0's Beta.
    """
    def floats(*tensors: torch.Tensor) -> tuple[float, ...]:
        return tuple(float(v) for t in tensors for v in t.detach().reshape(-1).tolist())

    return GroupPlan(components, bool(zero_component), tuple(suffixes), fixed_pi_zero, float(constant),
                     float(means_precision), None if gamma is None else floats(gamma[0]),
                     None if gamma is None else floats(gamma[1]), None if dirichlet is None else floats(dirichlet),
                     None if beta is None else floats(*beta))


@functools.lru_cache(maxsize=256)
def _group_struct(plan: GroupPlan) -> tuple[_GroupPlanStruct, tuple[ctypes.Array, ...]]:
    """The C struct of a plan, and the arrays it points into (kept alive with it, in this cache)."""
    arrays = {name: (ctypes.c_double * len(values))(*values)
              for name in _ARRAY_FIELDS if (values := getattr(plan, name)) is not None}
    fixed = plan.fixed_pi_zero is not None
    struct = _GroupPlanStruct(
        components=plan.components, zero_component=int(plan.zero_component),
        has_means=int("means" in plan.suffixes), has_pi=int("pi" in plan.suffixes),
        has_pi_zero=int("pi_zero" in plan.suffixes), fixed_pi_zero=int(fixed),
        log_pi_zero=math.log(plan.fixed_pi_zero) if fixed else 0.0,
        log1m_pi_zero=math.log1p(-plan.fixed_pi_zero) if fixed else 0.0,
        constant=plan.constant, means_precision=plan.means_precision,
        **{name: ctypes.addressof(array) for name, array in arrays.items()})
    return struct, tuple(arrays.values())


class _Native:
    """The C kernel through ctypes, its ranges on torch's OpenMP threads where the build has OpenMP."""

    def __init__(self, library: ctypes.CDLL) -> None:
        pointer, integer, double = ctypes.c_void_p, ctypes.c_int, ctypes.c_double
        self._functions, self._groups, self._nonfinite = {}, {}, {}
        for dtype, name in ((torch.float32, "sws_mixture_f32"), (torch.float64, "sws_mixture_f64")):
            function = getattr(library, name)
            function.argtypes = [integer, pointer, pointer, pointer, pointer, pointer, pointer, integer, double,
                                 pointer, integer]
            function.restype = integer
            self._functions[dtype] = function
            # a build of an earlier kernel source has none (or its forerunner, *_group, without gradient_scale)
            if hasattr(library, f"{name}_joint"):
                group = getattr(library, f"{name}_joint")
                group.argtypes = [pointer] * 5 + [integer, pointer, pointer, pointer, double, double, double,
                                                  integer] + [pointer] * 5
                group.restype = integer
                self._groups[dtype] = group
            if hasattr(library, f"{name}_nonfinite"):  # nor one from before the finite check
                nonfinite = getattr(library, f"{name}_nonfinite")
                nonfinite.argtypes = [integer, pointer, pointer, integer]
                nonfinite.restype = integer
                self._nonfinite[dtype] = nonfinite
        self.openmp = bool(library.sws_openmp())

    def supports(self, weights: torch.Tensor, components: int) -> bool:
        return (weights.device.type == "cpu" and weights.dtype in self._functions
                and components <= _MAX_NATIVE_COMPONENTS)

    def _segments(self, segments: Sequence[torch.Tensor], grad_outs: Sequence[torch.Tensor] | None, components: int):
        """The kernel's segment arguments: count, pointers, lengths, gradient pointers, margin, parts."""
        count, pointers, lengths, parts = self._layout(segments)
        grads = None if grad_outs is None else (ctypes.c_void_p * count)(*(g.data_ptr() for g in grad_outs))
        margin = skip_margin(segments[0].dtype, components) if skipping() else math.inf
        return count, pointers, lengths, grads, margin, parts

    def _layout(self, segments: Sequence[torch.Tensor]):
        """Segments laid end to end for the kernel: count, pointers, lengths, parts (threads)."""
        count, n = len(segments), sum(t.numel() for t in segments)
        threads = min(torch.get_num_threads(), _MAX_NATIVE_PARTS) if self.openmp else 1
        parts = max(1, min(threads, n // _MIN_WEIGHTS_PER_THREAD))
        pointers = (ctypes.c_void_p * count)(*(t.data_ptr() for t in segments))
        lengths = (ctypes.c_long * count)(*(t.numel() for t in segments))
        return count, pointers, lengths, parts

    def any_nonfinite(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether a value of these contiguous CPU tensors, all of one dtype it supports, is NaN or infinite."""
        status = self._nonfinite[tensors[0].dtype](*self._layout(tensors))
        if status < 0:
            raise RuntimeError("the native finite check rejected its arguments")
        return bool(status)

    def value_and_grads(self, segments, mixture, grad_outs, summary_out, *, chunk_size=None) -> None:
        # Every tensor is contiguous and of the weights' dtype (mixture_log_prob_sum sees to it),
        # of any shape (read flat); grad_outs None skips the weight gradients. The segments are
        # read in place.
        log_proportions, means, scales = mixture
        components = log_proportions.numel()
        count, pointers, lengths, grads, margin, parts = self._segments(segments, grad_outs, components)
        status = self._functions[segments[0].dtype](
            count, pointers, lengths, grads, log_proportions.data_ptr(), means.data_ptr(), scales.data_ptr(),
            components, margin, summary_out.data_ptr(), parts)
        if status:
            raise RuntimeError("the native mixture kernel rejected its arguments")

    def has_groups(self, weights: torch.Tensor) -> bool:
        """Whether :meth:`group_value_and_grads` takes these weights (the library has the group function)."""
        return weights.dtype in self._groups

    def group_value_and_grads(self, plan: GroupPlan, coordinates: Sequence[torch.Tensor],
                              weights: Sequence[torch.Tensor], prior_weight: float, *,
                              weight_gradients: bool = True, gradient_scale: float = 1.0
                              ) -> tuple[torch.Tensor, list[torch.Tensor] | None, list[torch.Tensor]]:
        """λ·Σ log p(w | mixture) + log p(mixture) of a group at a point, with every gradient, in one call.

        Parameters
        ----------
        plan : GroupPlan
        coordinates : sequence of Tensor
            The sites' unconstrained coordinates in ``plan.suffixes`` order, contiguous,
            of the weights' dtype (``SoftWeightSharingPrior.group_log_joint`` sees to it).
        weights : sequence of Tensor
            The group's contiguous weight tensors, read in place.
        prior_weight : float
            λ.
        weight_gradients : bool
            ``False`` skips the weights' gradients.
        gradient_scale : float
            Every gradient comes times this (the value does not): −1 gives a loss of minus
            the value its gradients as they are.

        Returns
        -------
        The value (shape ``()``), the weights' gradients (λ times the prior's; ``None``
        where λ = 0 or not asked for) and the coordinates' gradients, in ``plan.suffixes`` order.
        """
        components = plan.components
        grad_weights = [torch.empty_like(w) for w in weights] if prior_weight and weight_gradients else None
        count, pointers, lengths, grads, margin, parts = self._segments(weights, grad_weights, components)
        value = weights[0].new_empty(())
        grad_coordinates = [torch.empty_like(u) for u in coordinates]
        by_suffix = dict(zip(plan.suffixes, zip(coordinates, grad_coordinates)))
        inputs = [by_suffix[s][0].data_ptr() if s in by_suffix else None for s in _GROUP_SUFFIXES]
        outputs = [by_suffix[s][1].data_ptr() if s in by_suffix else None for s in _GROUP_SUFFIXES]
        struct, _ = _group_struct(plan)
        status = self._groups[weights[0].dtype](ctypes.byref(struct), *inputs, count, pointers, lengths, grads,
                                                prior_weight, gradient_scale, margin, parts, value.data_ptr(),
                                                *outputs)
        if status:
            raise RuntimeError("the native mixture kernel rejected its arguments")
        return value, grad_weights, grad_coordinates

    def value(self, segments, mixture, *, chunk_size=None) -> torch.Tensor:
        summary = segments[0].new_empty(1 + 3 * mixture[0].numel())
        self.value_and_grads(segments, mixture, None, summary)
        return summary[0]


# The fast-math flags the kernel's loops need to vectorise, less -ffinite-math-only (its
# NaN checks need IEEE comparisons). Linking takes none of them: -ffast-math at the
# link adds crtfastmath.o, which turns on flush-to-zero for the whole process on load.
_COMPILE_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
                  "-fno-signed-zeros", "-freciprocal-math", "-ffp-contract=fast", "-fPIC")
# x86 compilers default to 256-bit vectors even where the CPU has AVX-512; the kernel's
# loops run 1.2-1.3 times faster on 512-bit ones (benchmarks/README.md). No effect without AVX-512.
_X86_FLAGS = ("-mprefer-vector-width=512",) if platform.machine().lower() in ("x86_64", "amd64") else ()
_LINK_FLAGS = ("-shared", "-fPIC")


def _compiler_identity(compiler: str) -> bytes:
    """What ``compiler --version`` prints: a cached build is only reused from the same compiler."""
    completed = subprocess.run([compiler, "--version"], capture_output=True, timeout=60)
    return completed.stdout + completed.stderr


def _compile_native(openmp: bool) -> tuple[Path, bool]:
    """The kernel's shared library from the cache, or compiled into it now.

    Parameters
    ----------
    openmp : bool
        Whether to build with ``-fopenmp``.

    Returns
    -------
    The library's path, and whether it was compiled by this call.
    """
    compiler = os.environ.get("CC", "cc")
    openmp_flags = ["-fopenmp"] if openmp else []
    compile_command = [compiler, *_COMPILE_FLAGS, *_X86_FLAGS, *openmp_flags, "-c"]
    link_command = [compiler, *_LINK_FLAGS, *openmp_flags]
    key = hashlib.sha256(b"\0".join([
        _SOURCE.read_bytes(), _compiler_identity(compiler),
        " ".join(compile_command).encode(), " ".join(link_command).encode(),
    ])).hexdigest()[:16]
    library = _cache_dir() / f"sws_kernel-{key}-{_cpu_signature()}.so"
    if library.exists():
        return library, False
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        objects, shared = Path(scratch, "sws_kernel.o"), Path(scratch, "sws_kernel.so")
        subprocess.run([*compile_command, "-o", str(objects), str(_SOURCE)],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([*link_command, "-o", str(shared), str(objects), "-lm"],
                       check=True, capture_output=True, timeout=120)
        os.replace(shared, library)
    return library, True


def _load_native(openmp: bool) -> _Native:
    """The kernel, loaded from the cache; a cached library that does not load is rebuilt (one warning)."""
    library, built = _compile_native(openmp)
    try:
        return _Native(ctypes.CDLL(str(library)))
    except (OSError, AttributeError) as error:
        if built:
            raise OSError(f"the freshly built {library} does not load: {error}") from error
        warnings.warn(f"bayes_sws: the cached native prior kernel {library} does not load ({error}); "
                      "rebuilding it", RuntimeWarning, stacklevel=2)
        library.unlink(missing_ok=True)
        return _Native(ctypes.CDLL(str(_compile_native(openmp)[0])))


def _build_native() -> _Native:
    """The kernel on OpenMP threads, or on one thread where the compiler has no OpenMP."""
    try:
        return _load_native(openmp=True)
    except (OSError, subprocess.SubprocessError):  # no OpenMP to build or load with: one thread
        return _load_native(openmp=False)


@functools.cache
def _native_or_reason() -> _Native | str:
    """The native kernel, or why it is unavailable here (with one warning, unless switched off)."""
    if os.environ.get("BAYES_SWS_NATIVE", "1") == "0":
        return "it is switched off by BAYES_SWS_NATIVE=0"
    if not _SOURCE.is_file():
        reason = f"its source {_SOURCE} is missing from this installation of bayes_sws"
    else:
        try:
            return _build_native()
        except (OSError, subprocess.SubprocessError) as error:
            detail = (getattr(error, "stderr", b"") or b"").decode(errors="replace")[:200]
            reason = (f"the C compiler {os.environ.get('CC', 'cc')!r} could not build it "
                      f"(is a C compiler installed?): {error} {detail}")
    warnings.warn(f"bayes_sws: native prior kernel unavailable: {reason}; using torch kernels",
                  RuntimeWarning, stacklevel=3)
    return reason


def _native() -> _Native | None:
    """The native kernel, or ``None`` where it cannot be built here."""
    native = _native_or_reason()
    return native if isinstance(native, _Native) else None


def native_available() -> bool:
    """Whether the C kernel builds and loads on this machine."""
    return _native() is not None


# --------------------------------------------------------------------------- selection

_DEFAULT_BACKEND = {"name": "auto"}
_SCOPED_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar("bayes_sws_kernel_backend",
                                                                             default=None)


def _checked(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "native":
        native = _native_or_reason()
        if not isinstance(native, _Native):
            raise BayesSWSError(f"kernels 'native' requested but the C kernel is unavailable: {native}; "
                                "use 'auto' or 'torch'")
    return name


def set_backend(name: str) -> None:
    """Choose how the prior is computed in this process: ``"auto"``, ``"torch"``, ``"compile"`` or ``"native"``.

    All give the same values and gradients to round-off. ``"native"`` falls back to
    ``"torch"`` for CUDA tensors; it raises :class:`~bayes_sws.errors.BayesSWSError` if
    the kernel cannot be built here, and for CPU weights it cannot handle (more than
    64 components, a dtype other than float32/float64). This is the process-wide default: a
    :func:`use_backend` block in force overrides it.

    Examples
    --------
    >>> set_backend("compile")   # torch.compile the chunk kernel (CPU or CUDA)
    >>> set_backend("auto")      # native C on CPU where it builds, torch elsewhere
    """
    _DEFAULT_BACKEND["name"] = _checked(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Compute the prior with this backend inside the ``with`` block, in this context only.

    The choice is a context variable: it does not leak into other threads (which
    start with the :func:`set_backend` default) or into other asyncio tasks, and the
    previous choice comes back on leaving the block, also when it raises.

    Parameters
    ----------
    name : str
        ``"auto"``, ``"torch"``, ``"compile"`` or ``"native"``, as for :func:`set_backend`.

    Examples
    --------
    >>> with use_backend("torch"):
    ...     pass   # priors evaluated here use the torch kernels
    """
    token = _SCOPED_BACKEND.set(_checked(name))
    try:
        yield
    finally:
        _SCOPED_BACKEND.reset(token)


def current_backend() -> str:
    """The backend name in force here: the innermost :func:`use_backend`, else :func:`set_backend`'s."""
    return _SCOPED_BACKEND.get() or _DEFAULT_BACKEND["name"]


def group_backend(weights: torch.Tensor, components: int) -> _Native | None:
    """The native backend where it is in force for these weights and its build has the group function."""
    chosen = backend(weights, components)
    return chosen if isinstance(chosen, _Native) and chosen.has_groups(weights) else None


def any_nonfinite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether a value of these floating-point tensors is NaN or infinite, in one fused pass a device and dtype.

    Contiguous float32 and float64 CPU tensors are read by the native kernel, where it
    is in force (:func:`current_backend` ``"auto"`` or ``"native"``), on torch's threads;
    the others go through the op ``torch.amp.GradScaler`` checks gradients with (at
    scale 1, which leaves them as they are), one device sync each.

    Parameters
    ----------
    tensors : sequence of Tensor
        Any shapes, devices and floating-point dtypes; e.g. every parameter's gradient.

    Examples
    --------
    >>> any_nonfinite([torch.zeros(3), torch.tensor([1.0, float("nan")])])
    True
    """
    native = _native() if current_backend() in ("auto", "native") else None
    by_kind: dict[tuple[torch.device, torch.dtype, bool], list[torch.Tensor]] = {}
    for tensor in tensors:
        if tensor.device.type == "meta":  # holds no values
            continue
        read_natively = (native is not None and tensor.device.type == "cpu" and tensor.dtype in native._nonfinite
                         and tensor.is_contiguous())
        by_kind.setdefault((tensor.device, tensor.dtype, read_natively), []).append(tensor)
    for (device, _, read_natively), group in by_kind.items():
        if read_natively:
            found = native.any_nonfinite(group)
        else:
            flag = torch.zeros((), dtype=torch.float32, device=device)
            # the op writes each tensor back: a copy of any whose elements may share memory (an expand)
            dense = [t if t.is_contiguous() else t.contiguous() for t in group]
            torch._amp_foreach_non_finite_check_and_unscale_(dense, flag,
                                                             torch.ones((), dtype=torch.float32, device=device))
            found = bool(flag)
        if found:
            return True
    return False


def backend(weights: torch.Tensor, components: int) -> _ChunkedTorch | _Native:
    """The row functions that will compute the prior for these weights, for the backend in force."""
    name = current_backend()
    if name == "compile":
        return _compiled()
    if name in ("auto", "native"):
        native = _native()
        if native is not None and native.supports(weights, components):
            return native
        if name == "native" and native is not None and weights.device.type == "cpu":
            raise BayesSWSError(f"kernels 'native' handles float32/float64 weights and at most "
                                f"{_MAX_NATIVE_COMPONENTS} components, got {weights.dtype} and {components}; "
                                "use 'auto' or 'torch'")
    return _TORCH
