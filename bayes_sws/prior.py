"""The soft weight-sharing prior: a mixture of Gaussians shared by many weights.

Every weight ``w_i`` of a group gets the same one-dimensional mixture

    p(w_i) = Σ_j π_j N(w_i | μ_j, σ_j²),        Ω(w) = −Σ_i log p(w_i)

(Nowlan & Hinton 1992; Bishop, PRML §5.5.7). This module holds

* :class:`GaussianMixture`, the mixture's parameters, fields ``(*batch, J)``: a
  batch of mixtures (e.g. one per posterior draw) broadcasts against the weights;
* :func:`mixture_log_density` and :func:`responsibilities`, the plain autograd
  reference forms (elementwise, any shape);
* :func:`mixture_log_prob_sum`, the fused, chunked value-and-gradient used on the
  hot path: one pass over the weights, one ``exp`` per (weight, component) pair,
  analytic gradients and O(N + chunk·J) extra memory; second derivatives go
  through the reference;
* :class:`MixturePrior`, a Pyro distribution over a whole weight tensor built on
  the fused path, so that it composes with ``poutine.scale``, autoguides,
  vectorised particles, ``Predictive`` and NUTS (traced too) with no special cases;
* :class:`Hyperpriors` and :class:`SoftWeightSharingPrior`, which turn a mixture
  configuration into Pyro sample sites and provide the closed-form EM update of
  the mixture with the weights held fixed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import fields
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import Independent, biject_to, constraints, transform_to
from torch.distributions.transforms import (AffineTransform, ComposeTransform, ExpTransform, IndependentTransform,
                                           SigmoidTransform, SoftmaxTransform, Transform)
from torch.distributions.mixture_same_family import MixtureSameFamilyConstraint

from . import kernels
from .spec import Hyperpriors, MixtureSpec

__all__ = [
    "GaussianMixture",
    "Hyperpriors",
    "MixturePrior",
    "SoftWeightSharingPrior",
    "mixture_log_density",
    "mixture_log_prob_sum",
    "responsibilities",
]


@biject_to.register(MixtureSameFamilyConstraint)
@transform_to.register(MixtureSameFamilyConstraint)
def _mixture_support_transform(constraint: MixtureSameFamilyConstraint):
    # Lets autoguides handle torch's MixtureSameFamily (used as a reference).
    return biject_to(constraint.base_constraint)


class GaussianMixture(NamedTuple):
    """Parameters of one-dimensional Gaussian mixtures; every field has shape ``(*batch, J)``.

    Leading dimensions index independent mixtures (e.g. posterior draws); the
    fields' batch shapes need only broadcast together. ``log_proportions`` are
    normalised over the last dimension: ``log_proportions.exp().sum(-1) == 1``.
    """

    log_proportions: torch.Tensor
    means: torch.Tensor
    scales: torch.Tensor

    @property
    def proportions(self) -> torch.Tensor:
        """Mixing proportions π, shape ``(*batch, J)``."""
        return self.log_proportions.exp()

    @property
    def precisions(self) -> torch.Tensor:
        """1/σ², shape ``(*batch, J)``."""
        return self.scales.pow(-2)

    @property
    def batch_shape(self) -> torch.Size:
        """The fields' leading shapes broadcast together."""
        return _broadcast_shapes(*(t.shape[:-1] for t in self))

    def detach(self) -> "GaussianMixture":
        return GaussianMixture(*(t.detach() for t in self))

    def as_dict(self) -> dict[str, list]:
        """``{"pi": [...], "mu": [...], "sigma": [...]}`` as plain (nested) lists of floats (for JSON)."""
        return {
            "pi": self.proportions.tolist(),
            "mu": self.means.tolist(),
            "sigma": self.scales.tolist(),
        }


def _broadcast_shapes(*shapes: torch.Size) -> torch.Size:
    """``torch.broadcast_shapes``, short-cut when all shapes are equal (the common, unbatched case)."""
    if all(shape == shapes[0] for shape in shapes[1:]):
        return torch.Size(shapes[0])
    return torch.broadcast_shapes(*shapes)


def _check_mixture(mixture: GaussianMixture) -> None:
    """Raise ``ValueError`` unless every field is ``(*batch, J)`` with one J and broadcasting batches."""
    def shapes() -> str:
        return ", ".join(str(tuple(t.shape)) for t in mixture)

    if any(t.dim() == 0 for t in mixture) or any(t.shape[-1] != mixture.means.shape[-1] for t in mixture):
        raise ValueError(f"mixture parameters must all have shape (..., J), got {shapes()}")
    try:
        mixture.batch_shape
    except RuntimeError as error:
        raise ValueError(f"mixture parameters' batch shapes do not broadcast: {shapes()}") from error


def _aligned(mixture: GaussianMixture, event_dim: int) -> GaussianMixture:
    """Views of the fields with ``event_dim`` singleton dimensions before J: ``(*batch, 1, …, 1, J)``."""
    index = (..., *(None,) * event_dim, slice(None))
    return GaussianMixture(*(t[index] for t in mixture))


def _sum_event(values: torch.Tensor, event_dim: int) -> torch.Tensor:
    """Sum over the last ``event_dim`` dimensions (none when it is 0)."""
    return values.flatten(values.dim() - event_dim).sum(-1) if event_dim else values


def _component_log_densities(weights: torch.Tensor, mixture: GaussianMixture, event_dim: int) -> torch.Tensor:
    """log π_j N(w | μ_j, σ_j²) for every weight and component, shape ``(*broadcast, J)``."""
    mixture = _aligned(mixture, event_dim)
    standardised = (weights.unsqueeze(-1) - mixture.means) / mixture.scales
    return mixture.log_proportions - mixture.scales.log() - kernels.HALF_LOG_2PI - 0.5 * standardised**2


def mixture_log_density(weights: torch.Tensor, mixture: GaussianMixture, *, event_dim: int = 0) -> torch.Tensor:
    """Elementwise log p(w) under the mixture; the autograd reference.

    Parameters
    ----------
    weights : Tensor of shape ``(*batch_w, *event)``
    mixture : GaussianMixture with fields of shape ``(*batch_m, J)``
        ``batch_m`` lines up with (broadcasts against) ``batch_w``.
    event_dim : int
        How many trailing dimensions of the weights share one mixture.

    Returns
    -------
    Tensor of shape ``(*broadcast(batch_w, batch_m), *event)``.

    Examples
    --------
    >>> mix = GaussianMixture(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([1.0]))
    >>> float(mixture_log_density(torch.tensor(0.0), mix))  # log N(0|0,1)
    -0.9189385...
    """
    return torch.logsumexp(_component_log_densities(weights, mixture, event_dim), dim=-1)


def responsibilities(weights: torch.Tensor, mixture: GaussianMixture, *, event_dim: int = 0) -> torch.Tensor:
    """γ_j(w_i) = π_j N(w_i|μ_j,σ_j²) / Σ_k π_k N(w_i|μ_k,σ_k²).

    Parameters
    ----------
    weights : Tensor of shape ``(*batch_w, *event)``
    mixture : GaussianMixture with fields of shape ``(*batch_m, J)``
    event_dim : int
        As in :func:`mixture_log_density`.

    Returns
    -------
    Tensor of shape ``(*broadcast(batch_w, batch_m), *event, J)`` whose last dimension sums to one.
    """
    return torch.softmax(_component_log_densities(weights, mixture, event_dim), dim=-1)


def _reference_log_prob_sum(weights: torch.Tensor, mixture: GaussianMixture, event_dim: int) -> torch.Tensor:
    return _sum_event(mixture_log_density(weights, mixture, event_dim=event_dim), event_dim)


# --------------------------------------------------------------------------- fused path


class _Rows(NamedTuple):
    """The broadcast rows, one kernel call each: row r pairs the weights' row ``weight_index[r]`` with ``mixture[r]``."""

    batch_shape: torch.Size  # of the result; R = batch_shape.numel() rows
    weight_index: Sequence[int]  # (R,)
    mixture: tuple[torch.Tensor, ...]  # three (R, J), contiguous


def _broadcast_rows(weight_batch: torch.Size, mixture: GaussianMixture) -> _Rows:
    components = mixture.means.shape[-1]
    if not weight_batch and all(t.dim() == 1 for t in mixture):  # one row, one mixture: the common case
        return _Rows(weight_batch, range(1), tuple(t.view(1, components) for t in mixture))
    try:
        batch_shape = _broadcast_shapes(weight_batch, mixture.batch_shape)
    except RuntimeError as error:
        raise ValueError(f"weights of batch shape {tuple(weight_batch)} and mixtures of batch shape "
                         f"{tuple(mixture.batch_shape)} do not broadcast") from error
    rows = batch_shape.numel()
    if weight_batch == batch_shape:
        weight_index = range(rows)
    else:
        weight_index = torch.arange(weight_batch.numel()).reshape(weight_batch).expand(batch_shape).reshape(rows).tolist()
    return _Rows(
        batch_shape,
        weight_index,
        tuple(t.expand(*batch_shape, components).reshape(rows, components).contiguous() for t in mixture),
    )


def _event_shape(weights: torch.Tensor, event_dim: int) -> torch.Size:
    return weights.shape[weights.dim() - event_dim :]


def _weight_rows(weights: Sequence[torch.Tensor], event_dims: Sequence[int]) -> list[torch.Tensor]:
    """Each tensor as ``(R_w, E_k)``: its rows of flattened event dimensions (views)."""
    return [t.view(t.shape[: t.dim() - k].numel(), _event_shape(t, k).numel()) for t, k in zip(weights, event_dims)]


def _reference_group_log_prob_sum(weights: Sequence[torch.Tensor], mixture: GaussianMixture,
                                  event_dims: Sequence[int]) -> torch.Tensor:
    return sum(_reference_log_prob_sum(t, mixture, k) for t, k in zip(weights, event_dims))


def _fused_rows(event_dims: tuple[int, ...], chunk_size: int | None, mixture: GaussianMixture,
                weights: Sequence[torch.Tensor]) -> tuple[torch.Size, list[torch.Tensor], torch.Tensor]:
    """The kernel over every row: ``(batch_shape, grad_weights, summaries)``.

    ``grad_weights[k]`` is shaped like the (broadcast) ``weights[k]``; ``summaries``
    ``(R, 1 + 3J)`` holds each row's value, then its gradients with respect to log π, μ and σ.
    """
    weight_batch = weights[0].shape[: weights[0].dim() - event_dims[0]]
    rows = _broadcast_rows(weight_batch, mixture)
    components = mixture.means.shape[-1]
    row_functions = kernels.backend(weights[0], components)
    # Shaped like the (broadcast) weights rather than views of one flattened tensor,
    # so that autograd can add the network's gradient into each in place.
    grad_weights = [t.new_empty(rows.batch_shape + _event_shape(t, k)) for t, k in zip(weights, event_dims)]
    summaries = weights[0].new_empty(rows.batch_shape.numel(), 1 + 3 * components)
    weight_rows = _weight_rows(weights, event_dims)
    grad_rows = [g.view(len(summaries), t.shape[1]) for g, t in zip(grad_weights, weight_rows)]
    for row, (index, row_summary, *row_mixture) in enumerate(zip(rows.weight_index, summaries, *rows.mixture)):
        row_functions.value_and_grads([t[index] for t in weight_rows], row_mixture,
                                      [g[row] for g in grad_rows], row_summary, chunk_size=chunk_size)
    return rows.batch_shape, grad_weights, summaries


def _graph_gradients(value: torch.Tensor, inputs: Sequence[torch.Tensor], needed: Sequence[bool],
                     grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Gradients of an autograd reference ``value`` with respect to the ``needed`` inputs, as a graph.

    A fused Function's backward pass that must itself be differentiable (``create_graph=True``)
    returns these: one entry per input, ``None`` where not needed or where ``value`` does not
    depend on it (a group's hyperpriors alone leave the weights out; flat ones are constant).
    """
    wanted = [t for t, need in zip(inputs, needed) if need]
    grads = iter(torch.autograd.grad(value, wanted, grad, create_graph=True, allow_unused=True)
                 if value.requires_grad else [None] * len(wanted))
    return tuple(next(grads) if need else None for need in needed)


class _FusedLogProbSum(torch.autograd.Function):
    """Sums of log p(w) over each tensor's event dimensions, gradients computed in the same pass.

    The output is a sum, so the first-order backward pass only rescales the
    gradients that the forward pass accumulated: nothing of size N×J is ever
    stored. The first backward pass scales the weights' gradients in place and hands
    them on; a second one (``retain_graph=True``) runs the kernel again. Gradients are
    summed back to each input's own shape where it was broadcast. A backward pass that
    builds a graph (``create_graph=True``) differentiates the autograd reference
    instead, so second derivatives exist.
    """

    @staticmethod
    def forward(ctx, event_dims, chunk_size, log_proportions, means, scales, *weights):
        batch_shape, grad_weights, summaries = _fused_rows(event_dims, chunk_size,
                                                          GaussianMixture(log_proportions, means, scales), weights)
        ctx.save_for_backward(log_proportions, means, scales, *weights)
        # kept on ctx, not saved: the first backward pass scales them in place
        ctx.buffers = (grad_weights, summaries)
        ctx.event_dims, ctx.chunk_size = event_dims, chunk_size
        return summaries[:, 0].view(batch_shape)

    @staticmethod
    def backward(ctx, grad_values):
        saved = ctx.saved_tensors
        mixture, weights = saved[:3], saved[3:]
        inputs = (*mixture, *weights)
        needed = ctx.needs_input_grad[2:]
        if torch.is_grad_enabled():
            value = _reference_group_log_prob_sum(weights, GaussianMixture(*mixture), ctx.event_dims)
            return (None, None, *_graph_gradients(value, inputs, needed, grad_values))
        if ctx.buffers is None:  # handed on to autograd (and maybe into .grad) by an earlier pass
            _, grad_weights, summaries = _fused_rows(ctx.event_dims, ctx.chunk_size, GaussianMixture(*mixture),
                                                     weights)
        else:
            (grad_weights, summaries), ctx.buffers = ctx.buffers, None
        per_row = grad_values.reshape(-1, 1) * summaries[:, 1:]
        grad_mixture = per_row.view(*grad_values.shape, 3, mixture[1].shape[-1]).unbind(-2)
        grad_tensors = [g.mul_(grad_values.reshape(grad_values.shape + (1,) * k))
                        for g, k in zip(grad_weights, ctx.event_dims)]
        grads = (*grad_mixture, *grad_tensors)
        return (None, None,
                *(g.sum_to_size(t.shape) if need else None for g, t, need in zip(grads, inputs, needed)))


def _checked_group(weights: torch.Tensor | Sequence[torch.Tensor],
                   event_dim: int | Sequence[int]) -> tuple[list[torch.Tensor], tuple[int, ...]]:
    """The weight tensors as a list and one event_dim per tensor; ``ValueError`` for bad shapes or mixed devices."""
    tensors = [weights] if isinstance(weights, torch.Tensor) else list(weights)
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise ValueError("weights must be a tensor or a non-empty sequence of tensors")
    event_dims = (event_dim,) * len(tensors) if isinstance(event_dim, int) else tuple(event_dim)
    if len(event_dims) != len(tensors):
        raise ValueError(f"event_dim gives {len(event_dims)} dimension counts for {len(tensors)} weight tensors")
    for t, k in zip(tensors, event_dims):
        if not 0 <= k <= t.dim():
            raise ValueError(f"event_dim must lie in [0, {t.dim()}] for weights of shape {tuple(t.shape)}, got {k}")
    batches = {tuple(t.shape[: t.dim() - k]) for t, k in zip(tensors, event_dims)}
    try:
        torch.broadcast_shapes(*batches)
    except RuntimeError:
        raise ValueError(f"the weight tensors' batch shapes do not broadcast: "
                         f"{', '.join(map(str, sorted(batches)))}") from None
    devices = {str(t.device) for t in tensors}
    if len(devices) > 1:  # (moving one would copy it on every call)
        raise ValueError(f"the weight tensors must be on one device, got {', '.join(sorted(devices))}")
    return tensors, event_dims


def mixture_log_prob_sum(
    weights: torch.Tensor | Sequence[torch.Tensor],
    mixture: GaussianMixture,
    *,
    event_dim: int | Sequence[int] = 1,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Σ_i log p(w_i) over the last ``event_dim`` dimensions: −Ω(w), fused and exact.

    Value and gradients (with respect to the weights and every mixture parameter)
    equal those of ``mixture_log_density(weights, mixture, event_dim=event_dim)``
    summed over those dimensions, to round-off, while extra memory stays
    O(N + chunk_size·J). Second derivatives are those of the reference.

    A sequence of tensors (e.g. the layers of one mixture group) gives one sum over
    all of them: the kernel reads them in one pass, in place (no concatenation), and
    accumulates the mixture's gradients once; each tensor's gradient comes back in
    its own shape. It equals the sum of the single-tensor calls, which is what tensors
    of different (broadcastable) batch shapes get: e.g. one site conditioned on S draws,
    ``(S, 1, 300)``, beside single values ``(300,)``.

    Parameters
    ----------
    weights : Tensor of shape ``(*batch_w, *event)``, or a sequence of them
        Independent weight tensors of ``event_dim`` dimensions, e.g. ``(B, N)``; in a
        sequence, tensors ``(*batch_k, *event_k)`` on one device, e.g.
        ``[(S, 1, 300, 784), (S, 1, 300)]`` with ``event_dim=(2, 1)``; ``batch_w`` is
        their broadcast batch shape (one kernel pass when they all share it).
    mixture : GaussianMixture with fields of shape ``(*batch_m, J)``
        One mixture per batch element: ``batch_m`` broadcasts against ``batch_w``,
        e.g. ``(S, 1, J)`` against weights ``(S, 1, 300, 784)``.
    event_dim : int or sequence of int
        How many trailing dimensions one sum runs over: for every tensor, or one
        count per tensor of a sequence.
    chunk_size : int, optional
        Weights per chunk for the torch backends (see :mod:`bayes_sws.kernels`);
        by default the length each runs fastest at.

    Returns
    -------
    Tensor of shape ``broadcast(batch_w, batch_m)``.

    Examples
    --------
    >>> mixture = GaussianMixture(torch.log(torch.tensor([0.9, 0.1])),
    ...                           torch.tensor([0.0, 0.5]), torch.tensor([0.01, 0.1]))
    >>> layer, bias = torch.zeros(300, 784), torch.zeros(300)
    >>> mixture_log_prob_sum([layer, bias], mixture, event_dim=(2, 1)).shape
    torch.Size([])
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    tensors, event_dims = _checked_group(weights, event_dim)
    _check_mixture(mixture)
    if len({t.shape[: t.dim() - k] for t, k in zip(tensors, event_dims)}) > 1:
        return sum(mixture_log_prob_sum(t, mixture, event_dim=k, chunk_size=chunk_size)
                   for t, k in zip(tensors, event_dims))
    # One dtype for weights and mixture (as torch's own promotion would give), so every
    # backend reads its inputs as the type they are and returns gradients of that type.
    dtype = tensors[0].dtype
    for t in (*tensors[1:], *mixture):
        dtype = torch.promote_types(dtype, t.dtype)
    device = tensors[0].device
    tensors = [t.to(device, dtype).contiguous() for t in tensors]
    mixture = GaussianMixture(*(t.to(device, dtype).contiguous() for t in mixture))
    if torch.jit.is_tracing():
        # torch.jit.trace cannot follow the kernels: the torch kernels' in-place row writes
        # fail on replay and torch.compile refuses to be traced. The plain form traces.
        return _reference_group_log_prob_sum(tensors, mixture, event_dims)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*tensors, *mixture)):
        return _FusedLogProbSum.apply(event_dims, chunk_size, *mixture, *tensors)
    rows = _broadcast_rows(tensors[0].shape[: tensors[0].dim() - event_dims[0]], mixture)
    row_functions = kernels.backend(tensors[0], mixture.means.shape[-1])
    weight_rows = _weight_rows(tensors, event_dims)
    values = tensors[0].new_empty(rows.batch_shape.numel())
    for slot, index, *row_mixture in zip(values, rows.weight_index, *rows.mixture):
        slot.copy_(row_functions.value([t[index] for t in weight_rows], row_mixture, chunk_size=chunk_size))
    return values.view(rows.batch_shape)


class MixturePrior(TorchDistribution):
    """I.i.d. Gaussian-mixture prior over every element of a weight tensor.

    The distribution is over the whole tensor (``event_shape`` is the weight
    shape), its log-density is −Ω(w), computed by :func:`mixture_log_prob_sum`.
    A batch of mixtures (fields ``(*batch_m, J)``) gives a batch of priors; the
    batch shape is ``batch_m`` or one it broadcasts to. Expanding never copies
    the mixture parameters.

    Parameters
    ----------
    mixture : GaussianMixture with fields of shape ``(*batch_m, J)``
    event_shape : torch.Size
        Shape of the weight tensor.
    batch_shape : torch.Size, optional
        A shape ``batch_m`` broadcasts to; by default ``batch_m``.
    chunk_size : int, optional
        Passed to :func:`mixture_log_prob_sum`.

    Examples
    --------
    >>> mixture = GaussianMixture(torch.log(torch.tensor([0.9, 0.1])),
    ...                           torch.tensor([0.0, 0.5]), torch.tensor([0.01, 0.1]))
    >>> prior = MixturePrior(mixture, event_shape=(300, 784))
    >>> prior.log_prob(torch.zeros(300, 784)).shape
    torch.Size([])
    """

    arg_constraints = {
        "log_proportions": constraints.real_vector,
        "means": constraints.real_vector,
        "scales": constraints.independent(constraints.positive, 1),
    }
    has_rsample = False

    def __init__(
        self,
        mixture: GaussianMixture,
        *,
        event_shape: torch.Size | tuple[int, ...],
        batch_shape: torch.Size | tuple[int, ...] | None = None,
        chunk_size: int | None = None,
        validate_args: bool | None = None,
    ) -> None:
        _check_mixture(mixture)
        mixture_batch = mixture.batch_shape
        batch_shape = mixture_batch if batch_shape is None else torch.Size(batch_shape)
        try:
            broadcasts = _broadcast_shapes(mixture_batch, batch_shape) == batch_shape
        except RuntimeError:
            broadcasts = False
        if not broadcasts:
            raise ValueError(f"mixtures of batch shape {tuple(mixture_batch)} do not broadcast "
                             f"to batch shape {tuple(batch_shape)}")
        self.mixture = mixture
        self.log_proportions, self.means, self.scales = mixture
        self.chunk_size = chunk_size
        super().__init__(batch_shape, torch.Size(event_shape), validate_args=validate_args)

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    def expand(self, batch_shape, _instance=None):
        return MixturePrior(
            self.mixture,
            event_shape=self.event_shape,
            batch_shape=batch_shape,
            chunk_size=self.chunk_size,
            validate_args=False,
        )

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        event_dim = len(self.event_shape)
        if value.shape[value.dim() - event_dim :] != self.event_shape:
            raise ValueError(f"value of shape {tuple(value.shape)} does not end in the event shape "
                             f"{tuple(self.event_shape)}")
        shape = _broadcast_shapes(value.shape[: value.dim() - event_dim], self.batch_shape)
        log_prob = mixture_log_prob_sum(value, self.mixture, event_dim=event_dim, chunk_size=self.chunk_size)
        return log_prob if log_prob.shape == shape else log_prob.expand(shape)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        mixture = _aligned(self.mixture, len(self.event_shape))
        with torch.no_grad():
            per_weight = (*shape, self.means.shape[-1])
            components = dist.Categorical(logits=mixture.log_proportions.expand(per_weight)).sample().unsqueeze(-1)
            means, scales = (t.expand(per_weight).gather(-1, components).squeeze(-1) for t in mixture[1:])
            return means + scales * torch.randn(shape, dtype=means.dtype, device=means.device)

    def _per_weight(self, moment: torch.Tensor) -> torch.Tensor:
        """A moment of each mixture, shape ``batch_m``, for every weight: ``(*batch, *event)``."""
        return moment[(..., *(None,) * len(self.event_shape))].expand(self._extended_shape())

    @property
    def mean(self) -> torch.Tensor:
        return self._per_weight((self.log_proportions.exp() * self.means).sum(-1))

    @property
    def variance(self) -> torch.Tensor:
        proportions = self.log_proportions.exp()
        second_moment = (proportions * (self.scales**2 + self.means**2)).sum(-1)
        return self._per_weight(second_moment - (proportions * self.means).sum(-1) ** 2)


# --------------------------------------------------------------------------- a group at a point


class _PointPlan(NamedTuple):
    """How :meth:`SoftWeightSharingPrior.group_log_joint` computes a configuration's mixture at a point.

    The sites' transforms, and their hyperpriors in closed form: log p(sites) is
    ``constant`` plus the terms :meth:`SoftWeightSharingPrior._point_mixture` adds, with
    the parameters below (0 or ``None`` where a site is flat or absent).
    """

    prior: SoftWeightSharingPrior
    suffixes: tuple[str, ...]
    site_priors: tuple[dist.Distribution, ...]
    shapes: tuple[torch.Size, ...]
    transforms: tuple[Transform, ...]  # transform_to(support) of each site
    closed_form: bool  # the transforms and hyperpriors are those the closed form takes
    constant: float
    means_precision: float  # 1/s² of the means' Normal(0, s)
    gamma: tuple[torch.Tensor, torch.Tensor] | None  # (α − 1, β) of the precisions' Gamma, (J,)
    dirichlet: torch.Tensor | float  # a − 1 of π's Dirichlet
    beta: tuple[torch.Tensor, torch.Tensor] | None  # (a − 1, b − 1) of π0's Beta
    native: kernels.GroupPlan | None  # the same for the native kernel's group function (closed form only)


def _unwrapped(transform: Transform) -> Transform:
    while isinstance(transform, IndependentTransform):
        transform = transform.base_transform
    return transform


def _is_identity(transform: Transform) -> bool:
    """Whether the transform is x ↦ x (torch's transform to the real line, elementwise or over event dimensions)."""
    transform = _unwrapped(transform)
    return isinstance(transform, ComposeTransform) and not transform.parts


def _is_exp(transform: Transform) -> bool:
    """Whether the transform is x ↦ exp(x) (torch's transform to the positive or non-negative reals)."""
    transform = _unwrapped(transform)
    if isinstance(transform, ComposeTransform) and len(transform.parts) == 2 \
            and isinstance(transform.parts[1], AffineTransform):
        affine = transform.parts[1]
        transform = transform.parts[0] if float(affine.loc) == 0 and float(affine.scale) == 1 else transform
    return isinstance(transform, ExpTransform)


def _point_plan(prior: SoftWeightSharingPrior, site_priors: dict[str, dist.Distribution]) -> _PointPlan:
    transforms = {suffix: transform_to(site_prior.support) for suffix, site_prior in site_priors.items()}
    bases = {suffix: site_prior.base_dist if isinstance(site_prior, Independent) else site_prior
             for suffix, site_prior in site_priors.items()}
    kinds = {"means": _is_identity, "precisions": _is_exp, "pi": lambda t: isinstance(t, SoftmaxTransform),
             "pi_zero": lambda t: isinstance(_unwrapped(t), SigmoidTransform)}
    families = {"means": dist.Normal, "precisions": dist.Gamma, "pi": dist.Dirichlet, "pi_zero": dist.Beta}
    closed_form = all(kinds[suffix](transforms[suffix])
                      and isinstance(bases[suffix], (dist.ImproperUniform, families[suffix])) for suffix in site_priors)
    constant, means_precision, gamma, dirichlet, beta = 0.0, 0.0, None, 0.0, None
    means, precisions, pi, pi_zero = (bases.get(suffix) for suffix in ("means", "precisions", "pi", "pi_zero"))
    if isinstance(means, dist.Normal):
        closed_form &= bool((means.loc == 0).all()) and means.scale.unique().numel() == 1
        scale = float(means.scale.reshape(-1)[0])
        constant -= means.loc.numel() * (math.log(scale) + kernels.HALF_LOG_2PI)
        means_precision = scale**-2
    if isinstance(precisions, dist.Gamma):
        shape, rate = precisions.concentration, precisions.rate
        constant += float((shape.double() * rate.double().log() - shape.double().lgamma()).sum())
        gamma = (shape - 1, rate)
    if isinstance(pi, dist.Dirichlet):
        concentration = pi.concentration.double()
        constant += float(concentration.sum().lgamma() - concentration.lgamma().sum())
        dirichlet = pi.concentration - 1
    if isinstance(pi_zero, dist.Beta):
        a, b = pi_zero.concentration1.double(), pi_zero.concentration0.double()
        constant += float((a + b).lgamma() - a.lgamma() - b.lgamma())
        beta = (pi_zero.concentration1 - 1, pi_zero.concentration0 - 1)
    native = kernels.group_plan(
        components=prior.n_components, zero_component=prior.zero_component, suffixes=tuple(site_priors),
        fixed_pi_zero=prior.pi_zero if prior.zero_component and prior.n_components > 1 and not prior.learns_pi_zero
        else None, constant=constant, means_precision=means_precision, gamma=gamma,
        dirichlet=dirichlet if isinstance(dirichlet, torch.Tensor) else None, beta=beta) if closed_form else None
    return _PointPlan(prior, tuple(site_priors), tuple(site_priors.values()),
                      tuple(site_prior.shape() for site_prior in site_priors.values()), tuple(transforms.values()),
                      closed_form, constant, means_precision, gamma, dirichlet, beta, native)


def _composed_group_log_joint(plan: _PointPlan, prior_weight: float, coordinates: Sequence[torch.Tensor],
                              weights: Sequence[torch.Tensor], *, reference: bool) -> torch.Tensor:
    """:meth:`SoftWeightSharingPrior.group_log_joint` as a composition of autograd operations.

    ``reference`` takes the autograd reference of the prior term (second derivatives),
    else the fused kernel.
    """
    values = {suffix: transform(u) for suffix, transform, u in zip(plan.suffixes, plan.transforms, coordinates)}
    mixture = plan.prior.assemble(values, like=weights[0])
    value = sum(site_prior.log_prob(values[suffix]) for suffix, site_prior in zip(plan.suffixes, plan.site_priors))
    if not prior_weight:
        return value
    event_dims = tuple(w.dim() for w in weights)
    if reference:
        return value + prior_weight * _reference_group_log_prob_sum(weights, mixture, event_dims)
    return value + prior_weight * mixture_log_prob_sum(list(weights), mixture, event_dim=event_dims)


class _GroupLogJoint(torch.autograd.Function):
    """λ·log p(w | mixture) + log p(mixture) of one group at a point, in one autograd node.

    Forward, without a graph, the value and every gradient: on the CPU one call of the
    native kernel's group function (the mixture from the coordinates, its hyperpriors,
    the pass over the weights read in place, and the mixture's gradients carried back to
    the coordinates); elsewhere :meth:`SoftWeightSharingPrior._point_mixture`, the
    kernel and :meth:`SoftWeightSharingPrior._coordinate_gradients` in closed form,
    where autograd would walk some forty operations on J-element tensors. Backward:
    those gradients times the upstream gradient, in place, in one pass. The native call
    writes them negated, so that a loss of minus this value (the fit loop's MAP loss, an
    upstream gradient of exactly −1 on the CPU) takes them with no pass at all. A second
    backward pass (``retain_graph=True``) runs the forward again; one that builds a
    graph (``create_graph=True``) differentiates the autograd reference instead.
    """

    @staticmethod
    def forward(ctx, plan: _PointPlan, prior_weight: float, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.plan, ctx.prior_weight = plan, prior_weight
        ctx.save_for_backward(*tensors)
        weight_gradients = any(ctx.needs_input_grad[2 + len(plan.suffixes):])
        value, *ctx.gradients = _GroupLogJoint._evaluate(plan, prior_weight, tensors, weight_gradients)
        return value

    @staticmethod
    def _evaluate(plan: _PointPlan, prior_weight: float, tensors: Sequence[torch.Tensor], weight_gradients: bool
                  ) -> tuple[torch.Tensor, list[torch.Tensor] | None, list[torch.Tensor], int]:
        """The value, the weights' gradients (``None`` where λ = 0 or not asked for), the coordinates', their sign.

        The gradients come times the sign: −1 from the native call, 1 from the torch path.
        """
        coordinates, weights = tensors[: len(plan.suffixes)], tensors[len(plan.suffixes):]
        components = plan.prior.n_components
        native = kernels.group_backend(weights[0], components) if plan.native is not None else None
        if native is not None:
            return (*native.group_value_and_grads(plan.native, coordinates, weights, prior_weight,
                                                  weight_gradients=weight_gradients, gradient_scale=-1.0), -1)
        values, mixture, value = plan.prior._point_mixture(plan, coordinates)
        grads = None
        field_grads = mixture.means.new_zeros(3, components)
        if prior_weight:
            grads = [torch.empty_like(w) for w in weights] if weight_gradients else None
            summary = weights[0].new_empty(1 + 3 * components)
            kernels.backend(weights[0], components).value_and_grads(weights, tuple(mixture), grads, summary)
            if grads is not None:
                torch._foreach_mul_(grads, prior_weight)
            value = value + prior_weight * summary[0]
            field_grads = (prior_weight * summary[1:]).view(3, components)
        return value, grads, plan.prior._coordinate_gradients(plan, coordinates, values, mixture, field_grads), 1

    @staticmethod
    def backward(ctx, grad_value: torch.Tensor):
        plan, prior_weight, tensors = ctx.plan, ctx.prior_weight, ctx.saved_tensors
        count = len(plan.suffixes)
        coordinates, weights = tensors[:count], tensors[count:]
        gradients, ctx.gradients = ctx.gradients, None
        if torch.is_grad_enabled():
            value = _composed_group_log_joint(plan, prior_weight, coordinates, weights, reference=True)
            return (None, None, *_graph_gradients(value, tensors, ctx.needs_input_grad[2:], grad_value))
        if gradients is None:  # handed on to autograd by an earlier pass
            weight_gradients = any(ctx.needs_input_grad[2 + count:])
            gradients = _GroupLogJoint._evaluate(plan, prior_weight, tensors, weight_gradients)[1:]
        grad_weights, grad_coordinates, sign = gradients
        grads = [g if need else None for g, need in zip((*grad_coordinates, *(grad_weights or [None] * len(weights))),
                                                        ctx.needs_input_grad[2:])]
        scaled = [g for g in grads if g is not None]
        # (reading a CUDA upstream gradient would wait for the device: it is multiplied in)
        if scaled and not (grad_value.device.type == "cpu" and float(grad_value) == sign):
            torch._foreach_mul_(scaled, grad_value if sign == 1 else -grad_value)  # one pass for all of them
        return (None, None, *grads)


# --------------------------------------------------------------------------- configuration


class SoftWeightSharingPrior(MixtureSpec):
    """A mixture configuration (:class:`~bayes_sws.spec.MixtureSpec`) with its Pyro sites and EM update.

    It declares the mixture's Pyro sample sites (:meth:`sample_mixture`), their
    starting values (:meth:`initial_mixture`) and the closed-form EM update
    (:meth:`em_update`). Sites of a group ``g`` are ``g.means`` (learned means),
    ``g.precisions`` (1/σ², all components), ``g.pi`` (mixing proportions of
    the learned components) and ``g.pi_zero`` (the zero component's mixing
    proportion, when learned). The settings are :class:`~bayes_sws.spec.MixtureSpec`'s.

    Examples
    --------
    >>> prior = SoftWeightSharingPrior(n_components=17, pi_zero=0.999,
    ...     hyperpriors=Hyperpriors(precision_gamma=(250, 0.1), zero_precision_gamma=(5000, 2)))
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "_site_prior_cache", {})

    @classmethod
    def from_spec(cls, mixture: MixtureSpec) -> SoftWeightSharingPrior:
        """The prior a specification's ``[prior]`` mixture settings describe."""
        return cls(**{f.name: getattr(mixture, f.name) for f in fields(MixtureSpec)})

    @property
    def n_free_means(self) -> int:
        """Components whose mean is learned."""
        return self.n_components - int(self.zero_component)

    @property
    def learns_pi_zero(self) -> bool:
        return self.zero_component and self.pi_zero is None and self.n_components > 1

    @property
    def n_free_proportions(self) -> int:
        """Components sharing the ``pi`` simplex site."""
        return self.n_components - int(self.zero_component and self.n_components > 1)

    # ---- sites

    def _site_priors(self, like: torch.Tensor) -> dict[str, dist.Distribution]:
        """The hyperprior of every site, keyed by suffix (``means``, ``precisions``, …).

        Built once per dtype, device and validation setting: they are constants, and
        a training step should not pay for creating them again.
        """
        key = (like.dtype, like.device, torch.distributions.Distribution._validate_args)
        if key not in self._site_prior_cache:
            with torch.inference_mode(False):  # normal tensors, usable later in training too
                self._site_prior_cache[key] = self._build_site_priors(like.dtype, like.device)
        return self._site_prior_cache[key]

    def _build_site_priors(self, dtype: torch.dtype, device: torch.device) -> dict[str, dist.Distribution]:
        hyper = self.hyperpriors
        options = {"dtype": dtype, "device": device}
        priors: dict[str, dist.Distribution] = {}
        if self.n_free_means:
            shape = (self.n_free_means,)
            priors["means"] = (
                dist.Normal(torch.zeros(shape, **options), hyper.means_scale).to_event(1)
                if hyper.means_scale is not None
                else dist.ImproperUniform(constraints.real, (), shape)
            )
        shape = (self.n_components,)
        if hyper.precision_gamma is not None:
            gamma = torch.tensor([hyper.precision_gamma] * self.n_components, **options)
            if self.zero_component and hyper.zero_precision_gamma is not None:
                gamma[0] = torch.tensor(hyper.zero_precision_gamma, **options)
            priors["precisions"] = dist.Gamma(gamma[:, 0], gamma[:, 1]).to_event(1)
        else:
            priors["precisions"] = dist.ImproperUniform(constraints.positive, (), shape)
        if self.n_free_proportions > 1:
            shape = (self.n_free_proportions,)
            priors["pi"] = (
                dist.Dirichlet(torch.full(shape, hyper.dirichlet, **options))
                if hyper.dirichlet is not None
                else dist.ImproperUniform(constraints.simplex, (), shape)
            )
        if self.learns_pi_zero:
            priors["pi_zero"] = (
                dist.Beta(*(torch.tensor(v, **options) for v in hyper.zero_proportion_beta))
                if hyper.zero_proportion_beta is not None
                else dist.ImproperUniform(constraints.unit_interval, (), ())
            )
        return priors

    def sample_mixture(self, group: str, *, like: torch.Tensor) -> GaussianMixture:
        """Declare the group's mixture sites in the current Pyro model and return the mixture.

        Parameters
        ----------
        group : str
            Prefix of the site names.
        like : Tensor
            Gives dtype and device.
        """
        values = {
            suffix: pyro.sample(f"{group}.{suffix}", prior)
            for suffix, prior in self._site_priors(like).items()
        }
        return self.assemble(values, like=like)

    def assemble(self, values: dict[str, torch.Tensor], *, like: torch.Tensor) -> GaussianMixture:
        """Turn site values keyed by suffix into a :class:`GaussianMixture`.

        Parameters
        ----------
        values : dict of Tensor
            ``precisions`` ``(*batch, J)``, ``means`` ``(*batch, J − zero)``, ``pi``
            ``(*batch, K)`` and ``pi_zero`` ``(*batch,)`` where the configuration has
            them; ``batch`` may be empty or differ between sites as long as they broadcast.
        like : Tensor
            Gives dtype and device of the fixed parts.

        Returns
        -------
        GaussianMixture with fields of shape ``(*batch, J)``, ``batch`` broadcast over the sites.
        """
        scales = values["precisions"].rsqrt()
        means = values["means"] if "means" in values else like.new_zeros(0)
        log_pi = values["pi"].log() if "pi" in values else like.new_zeros(1)
        if self.zero_component:
            means = torch.nn.functional.pad(means, (1, 0))
        if self.zero_component and self.n_components > 1 and "pi_zero" in values:
            pi_zero = values["pi_zero"]
            rest = torch.log1p(-pi_zero).unsqueeze(-1) + log_pi
            first = pi_zero.log().unsqueeze(-1).expand(rest.shape[:-1] + (1,))
            log_pi = torch.cat([first, rest], dim=-1)
        elif self.zero_component and self.n_components > 1:  # a fixed π0: its logarithms are constants
            log_pi = torch.nn.functional.pad(log_pi + math.log1p(-self.pi_zero), (1, 0), value=math.log(self.pi_zero))
        fields = (log_pi, means, scales)
        if log_pi.shape == means.shape == scales.shape:
            return GaussianMixture(*fields)
        return GaussianMixture(*torch.broadcast_tensors(*fields))

    def split(self, mixture: GaussianMixture) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`assemble`: site values keyed by suffix, with the mixture's batch shape."""
        offset = int(self.zero_component)
        values = {"precisions": mixture.precisions}
        if self.n_free_means:
            values["means"] = mixture.means[..., offset:]
        proportions = mixture.proportions
        if self.learns_pi_zero:
            values["pi_zero"] = proportions[..., 0]
        if self.n_free_proportions > 1:
            free = proportions[..., offset:] if self.n_components > 1 else proportions
            values["pi"] = free / free.sum(-1, keepdim=True)
        return values

    def initial_mixture(self, weights: torch.Tensor) -> GaussianMixture:
        """The starting mixture: means evenly over ``init_means`` (or the weights' range).

        Parameters
        ----------
        weights : Tensor, any shape
            The weights the mixture will model (gives the default range, dtype, device).
        """
        options = {"dtype": weights.dtype, "device": weights.device}
        low, high = self.init_means or (float(weights.min()), float(weights.max()))
        means = torch.linspace(low, high, self.n_free_means, **options)
        if self.n_free_means == 1:
            means = torch.full((1,), 0.5 * (low + high), **options)
        if self.zero_component:
            means = torch.cat([torch.zeros(1, **options), means])
        scales = torch.full((self.n_components,), self.init_scale, **options)
        log_proportions = torch.full((self.n_components,), -math.log(self.n_components), **options)
        if self.zero_component and self.n_components > 1:
            pi_zero = self.pi_zero if self.pi_zero is not None else 1.0 / self.n_components
            rest = math.log1p(-pi_zero) - math.log(self.n_components - 1)
            log_proportions = torch.tensor([math.log(pi_zero)] + [rest] * (self.n_components - 1), **options)
        return GaussianMixture(log_proportions, means, scales)

    def log_hyperprior(self, mixture: GaussianMixture) -> torch.Tensor:
        """log p(π, μ, 1/σ²) of a mixture, in the sites' own coordinates."""
        values = self.split(mixture)
        priors = self._site_priors(mixture.means)
        return sum(priors[name].log_prob(value) for name, value in values.items())

    def group_log_joint(self, weights: Sequence[torch.Tensor], coordinates: dict[str, torch.Tensor], *,
                        prior_weight: float = 1.0) -> torch.Tensor:
        """λ·log p(w | π, μ, σ) + log p(π, μ, 1/σ²) of one group at a point, from its sites' unconstrained coordinates.

        Each mixture site's value is ``transform_to(support)(coordinates[suffix])``, the
        coordinates ``AutoDelta`` keeps as its parameters. Equal, value and gradients,
        to transforming them, :meth:`assemble`, ``prior_weight`` times
        :func:`mixture_log_prob_sum` and the hyperpriors' ``log_prob``, to round-off;
        computed in one autograd node whose backward pass carries the mixture's
        gradients to the coordinates in closed form (the MAP loss's hot path).

        Parameters
        ----------
        weights : sequence of Tensor
            The group's weight tensors, each of its site's shape (no batch dimensions).
        coordinates : dict of str to Tensor
            Suffix (``means``, ``precisions``, ``pi``, ``pi_zero``: the sites this
            configuration has) → unconstrained coordinates, shaped like the site.
        prior_weight : float
            λ; 0 leaves the hyperpriors only.

        Returns
        -------
        Tensor of shape ``()``.

        Examples
        --------
        >>> prior = SoftWeightSharingPrior(n_components=3, pi_zero=0.9)
        >>> w = torch.zeros(20, 10, requires_grad=True)
        >>> u = {"means": torch.tensor([-0.1, 0.1]), "precisions": torch.zeros(3), "pi": torch.zeros(2)}
        >>> prior.group_log_joint([w], u, prior_weight=1e-3).shape
        torch.Size([])
        """
        weights = list(weights)
        plan = self._point_plan(weights[0])
        if set(coordinates) != set(plan.suffixes):
            raise ValueError(f"coordinates of sites {sorted(coordinates)}; this mixture has {sorted(plan.suffixes)}")
        ordered = [coordinates[suffix] for suffix in plan.suffixes]
        tensors = (*ordered, *weights)
        if plan.closed_form and not torch.jit.is_tracing() and torch.is_grad_enabled() \
                and any(t.requires_grad for t in tensors) and all(t.dtype == weights[0].dtype for t in tensors) \
                and all(t.shape == shape for t, shape in zip(ordered, plan.shapes)) \
                and all(t.is_contiguous() for t in tensors):  # the kernel reads the weights and mixture flat
            return _GroupLogJoint.apply(plan, float(prior_weight), *tensors)
        return _composed_group_log_joint(plan, prior_weight, ordered, weights, reference=False)

    def _point_plan(self, like: torch.Tensor) -> _PointPlan:
        key = ("point", like.dtype, like.device, torch.distributions.Distribution._validate_args)
        if key not in self._site_prior_cache:
            self._site_prior_cache[key] = _point_plan(self, self._site_priors(like))
        return self._site_prior_cache[key]

    def _point_mixture(self, plan: _PointPlan, coordinates: Sequence[torch.Tensor]
                       ) -> tuple[dict[str, torch.Tensor], GaussianMixture, torch.Tensor]:
        """The sites' values, the mixture and log p(sites) at coordinates, in closed form (``plan.closed_form``).

        log p(sites) = constant − μ·μ/(2s²) + Σ_j (α_j − 1) u_j − β_j τ_j + (a − 1) Σ_k log π_k
        + (a0 − 1) log π0 + (b0 − 1) log(1 − π0), u the precisions' coordinates (τ = exp u).
        """
        u = dict(zip(plan.suffixes, coordinates))
        values = {"precisions": u["precisions"].exp()}
        log_p = plan.constant
        if "means" in u:
            values["means"] = u["means"]
            if plan.means_precision:
                log_p = log_p - 0.5 * plan.means_precision * u["means"].dot(u["means"])
        if plan.gamma is not None:
            shape_minus_one, rate = plan.gamma
            log_p = log_p + (shape_minus_one.dot(u["precisions"]) - rate.dot(values["precisions"]))
        if "pi" in u:
            values["pi"] = u["pi"].softmax(-1)
            if isinstance(plan.dirichlet, torch.Tensor):
                log_p = log_p + plan.dirichlet.dot(u["pi"].log_softmax(-1))
        if "pi_zero" in u:
            values["pi_zero"] = pi_zero = plan.transforms[plan.suffixes.index("pi_zero")](u["pi_zero"])
            if plan.beta is not None:
                log_p = log_p + plan.beta[0] * pi_zero.log() + plan.beta[1] * torch.log1p(-pi_zero)
        mixture = self.assemble(values, like=u["precisions"])
        return values, mixture, torch.as_tensor(log_p, dtype=u["precisions"].dtype, device=u["precisions"].device)

    def _coordinate_gradients(self, plan: _PointPlan, coordinates: Sequence[torch.Tensor],
                              values: dict[str, torch.Tensor], mixture: GaussianMixture,
                              field_grads: torch.Tensor) -> list[torch.Tensor]:
        """The gradient of a group's λ·log p(w | mixture) + log p(mixture) with respect to each site's coordinates.

        ``field_grads`` ``(3, J)`` holds the prior term's gradients with respect to the
        mixture's log π, μ and σ; this is :meth:`_point_mixture` (and :meth:`assemble`
        in it) differentiated by hand, in the order of ``plan.suffixes``. π's
        coordinates are chained through log π, so a π_k that underflows to 0 divides nothing.
        """
        grad_log_pi, grad_means, grad_scales = field_grads
        u = dict(zip(plan.suffixes, coordinates))
        offset = int(self.zero_component)
        grads = {"precisions": -0.5 * grad_scales * mixture.scales}  # σ = exp(−u/2)
        if plan.gamma is not None:
            shape_minus_one, rate = plan.gamma
            grads["precisions"] = grads["precisions"] + shape_minus_one - rate * values["precisions"]
        if "means" in u:
            grads["means"] = grad_means[offset:]
            if plan.means_precision:
                grads["means"] = grads["means"] - plan.means_precision * u["means"]
        if "pi" in u:
            score = grad_log_pi[offset:] + plan.dirichlet if isinstance(plan.dirichlet, torch.Tensor) \
                else grad_log_pi[offset:]
            grads["pi"] = score - values["pi"] * score.sum()
        if "pi_zero" in u:
            pi_zero = values["pi_zero"]
            a_minus_one, b_minus_one = plan.beta if plan.beta is not None else (0.0, 0.0)
            grads["pi_zero"] = ((grad_log_pi[0] + a_minus_one) * (1 - pi_zero)
                                - (grad_log_pi[1:].sum() + b_minus_one) * pi_zero)
        return [grads[suffix] for suffix in plan.suffixes]

    # ---- EM

    def em_update(
        self,
        weights: torch.Tensor,
        mixture: GaussianMixture,
        *,
        prior_weight: float = 1.0,
        chunk_size: int = 1 << 16,
    ) -> GaussianMixture:
        """One EM (ECM) step for the mixture with the weights held fixed.

        Maximises ``prior_weight · Σ_i log p(w_i | π, μ, σ) + log p(π, μ, 1/σ²)``
        in closed form from the responsibilities: π from the weighted counts
        (plus Dirichlet/Beta pseudo-counts), then μ given the current σ, then
        1/σ² given the new μ (Normal and Gamma hyperpriors are conjugate). Fixed
        parts (μ0 = 0, a fixed π0) stay fixed. Each step never decreases the
        objective.

        Parameters
        ----------
        weights : Tensor, any shape (flattened; N elements)
        mixture : GaussianMixture with fields of shape ``(J,)``
        prior_weight : float
            λ, the weight of the prior term.
        chunk_size : int
            Weights per chunk when accumulating statistics (memory O(chunk·J)).

        Returns
        -------
        GaussianMixture, the updated parameters (same dtype and device).
        """
        _check_mixture(mixture)
        if mixture.batch_shape:
            raise ValueError(f"em_update takes one mixture (fields of shape (J,)), got batch shape "
                             f"{tuple(mixture.batch_shape)}")
        flat = weights.detach().reshape(-1).double()
        mixture = GaussianMixture(*(t.detach().double() for t in mixture))
        counts = torch.zeros_like(mixture.means)
        weighted_sums = torch.zeros_like(mixture.means)
        for chunk in flat.split(chunk_size):
            gamma = responsibilities(chunk, mixture)
            counts += gamma.sum(0)
            weighted_sums += gamma.T @ chunk
        counts, weighted_sums = prior_weight * counts, prior_weight * weighted_sums
        hyper = self.hyperpriors
        offset = int(self.zero_component)

        means = mixture.means.clone()
        prior_precision = 0.0 if hyper.means_scale is None else hyper.means_scale**-2
        precision_sum = mixture.precisions * counts + prior_precision
        updatable = precision_sum > 0
        updatable[:offset] = False
        means[updatable] = (mixture.precisions * weighted_sums)[updatable] / precision_sum[updatable]

        scatter = torch.zeros_like(means)
        for chunk in flat.split(chunk_size):
            gamma = responsibilities(chunk, mixture)
            scatter += (gamma * (chunk.unsqueeze(1) - means) ** 2).sum(0)
        scatter = prior_weight * scatter
        shape_, rate_ = torch.ones_like(means), torch.zeros_like(means)
        if hyper.precision_gamma is not None:
            shape_[:], rate_[:] = hyper.precision_gamma
            if self.zero_component and hyper.zero_precision_gamma is not None:
                shape_[0], rate_[0] = hyper.zero_precision_gamma
        numerator = shape_ - 1 + 0.5 * counts
        denominator = rate_ + 0.5 * scatter
        updatable = (numerator > 0) & (denominator > 0)
        precisions = mixture.precisions.clone()
        precisions[updatable] = numerator[updatable] / denominator[updatable]

        log_proportions = self._em_mixing(counts, mixture.log_proportions)
        updated = GaussianMixture(log_proportions, means, precisions.rsqrt())
        return GaussianMixture(*(t.to(weights.dtype) for t in updated))

    def _em_mixing(self, counts: torch.Tensor, log_proportions: torch.Tensor) -> torch.Tensor:
        """M-step for the mixing proportions from weighted counts (λ·Σ_i γ_ij)."""
        hyper = self.hyperpriors
        has_zero_split = self.zero_component and self.n_components > 1
        free = counts[1:] if has_zero_split else counts
        # The Dirichlet is on the ``pi`` site, which exists only with two or more free components.
        pseudo = hyper.dirichlet - 1.0 if hyper.dirichlet is not None and self.n_free_proportions > 1 else 0.0
        free = (free + pseudo).clamp_min(0)
        if free.sum() <= 0:
            return log_proportions
        free = free / free.sum()
        if not has_zero_split:
            return free.log()
        if self.pi_zero is not None:
            pi_zero = counts.new_tensor(self.pi_zero)
        else:
            a, b = hyper.zero_proportion_beta or (1.0, 1.0)
            pi_zero = ((counts[0] + a - 1) / (counts.sum() + a + b - 2)).clamp(1e-12, 1 - 1e-12)
        return torch.cat([pi_zero.log().reshape(1), torch.log1p(-pi_zero) + free.log()])
