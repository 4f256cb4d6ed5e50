"""Fitting the model: MAP, variational inference and NUTS, all on the one model function.

MAP and VI run in the one fit loop (:mod:`bayes_sws.fitting`); NUTS is Pyro's
sampler on the same model. Any fit's posterior comes out as
:class:`PosteriorSamples` (:func:`sample_guide` for a fitted guide, :func:`fit_nuts`).

MAP: an ``AutoDelta`` guide and :func:`map_loss`.

With a Delta guide the ELBO's entropy term is zero, so the loss is exactly
E(w) + λΩ(w) − log p(π, μ, 1/σ²) (docs/objective.md), minimised by

* ``"adam"``: minibatch steps (N/B-scaled likelihood), one learning rate per
  parameter group (weights, means, precisions, mixing proportions);
* ``"lbfgs"`` and ``"cg"``: full-batch iterations;
* optionally an EM update of the mixtures, weights held fixed, every few steps
  (:class:`EMUpdate`).
"""

from __future__ import annotations

import contextlib
import math
import operator
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pyro
import torch
from pyro import poutine
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.distributions.util import scale_and_mask
from pyro.infer import MCMC, NUTS, Trace_ELBO
from pyro.infer.autoguide import (
    AutoContinuous,
    AutoDelta,
    AutoGuide,
    AutoGuideList,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
    init_to_value,
)
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.poutine.messenger import Messenger
from torch.distributions import biject_to, transform_to

from .data import Dataset
from .fitting import Callback, Evaluate, FitState, fit, library_scope, start_fit
from .model import SoftWeightSharingModel
from .errors import BayesSWSError
from .local_reparam import (WeightPosterior, active_weight_posterior, check_local_layers, mean_field_part,
                            weight_posterior)
from .optim import LearningRates
from .prior import _is_identity

__all__ = [
    "EMUpdate",
    "MIXTURE_GUIDES",
    "NUTS_MAX_WEIGHTS",
    "NegativeELBO",
    "WEIGHT_GUIDES",
    "PosteriorSamples",
    "check_nuts",
    "fit_map",
    "fit_nuts",
    "fit_vi",
    "map_guide",
    "map_loss",
    "sample_guide",
    "vi_guide",
    "vi_loss",
    "write_point",
]

MIXTURE_GUIDES = ("full", "lowrank", "diagonal")
"""Guides of the mixture sites under VI: full-rank, low-rank (+ diagonal) multivariate normal, or mean-field."""

WEIGHT_GUIDES = ("diagonal", "full")
"""Guides of the weights under VI: mean-field Normal, or one full-rank normal over all sites (small models)."""

NUTS_MAX_WEIGHTS = 2000
"""The most prior weights :func:`fit_nuts` accepts: NUTS beyond a few thousand dimensions does not mix here."""


@dataclass
class PosteriorSamples:
    """Draws of every sample site from a fit, in ArviZ's (chain, draw) layout.

    A MAP fit is one chain of one draw (the point); a variational fit one chain of
    draws from the guide; NUTS one chain per Markov chain, with its sampler statistics.

    Attributes
    ----------
    method : str
        ``"map"``, ``"vi"`` or ``"nuts"``.
    samples : dict of str to Tensor
        Each site's draws, ``(chains, draws, *site_shape)``.
    sample_stats : dict of str to Tensor
        Sampler statistics per draw, ``(chains, draws)`` (e.g. ``"diverging"``,
        ``"energy"`` for NUTS); empty where the method has none.
    """

    method: str
    samples: dict[str, torch.Tensor]
    sample_stats: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def n_chains(self) -> int:
        return next(iter(self.samples.values())).shape[0]

    @property
    def n_draws(self) -> int:
        return next(iter(self.samples.values())).shape[1]

    def flat(self) -> dict[str, torch.Tensor]:
        """The draws with chains and draws merged: ``(chains * draws, *site_shape)``."""
        return {name: value.reshape(-1, *value.shape[2:]) for name, value in self.samples.items()}


def _is_point_guide(guide: AutoGuide) -> bool:
    if isinstance(guide, AutoGuideList):
        return all(_is_point_guide(part) for part in guide)
    return isinstance(guide, AutoDelta)


def sample_guide(model: SoftWeightSharingModel, guide: AutoGuide, *, num_draws: int, seed: int) -> PosteriorSamples:
    """Draws of every latent site from a guide, all at once: one chain of ``num_draws``.

    The guide runs once inside a plate of ``num_draws`` (vectorised, no loop over
    draws), on a forked RNG seeded with ``seed`` (the caller's RNG is left as it was).
    An ``AutoDelta`` gives its point repeated (method ``"map"``); any other guide,
    e.g. a variational one, its own draws (method ``"vi"``).

    Parameters
    ----------
    model : SoftWeightSharingModel
        The model the guide was fitted to (its sites name the draws).
    guide : AutoGuide
        Already set up (called once, as a fit does).
    num_draws : int
    seed : int

    Returns
    -------
    PosteriorSamples with ``samples[site]`` of shape ``(1, num_draws, *site_shape)`` and
    no ``sample_stats``.
    """
    if num_draws < 1:
        raise ValueError(f"num_draws must be at least 1, got {num_draws}")
    if guide.prototype_trace is None:
        raise ValueError("the guide has no parameters yet: fit it, or call it once on a batch")
    sites = {name: site["value"] for name, site in guide.prototype_trace.iter_stochastic_nodes()
             if not site["infer"].get("is_auxiliary")}
    shapes = {name: value.shape for name, value in sites.items()}
    device = next(iter(sites.values())).device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), library_scope(), torch.no_grad():
        torch.manual_seed(seed)
        with pyro.plate("bayes_sws_draws", num_draws, dim=-_max_plate_nesting(guide) - 1):
            trace = poutine.trace(guide).get_trace()
    samples = {}
    for name, shape in shapes.items():
        value = trace.nodes[name]["value"]
        lead = value.shape[: value.dim() - len(shape)]
        samples[name] = value.reshape(lead.numel(), *shape).expand(num_draws, *shape).clone()[None]
    return PosteriorSamples(method="map" if _is_point_guide(guide) else "vi", samples=samples)


def _max_plate_nesting(guide: AutoGuide) -> int:
    frames = [frame.dim for _, site in guide.prototype_trace.iter_stochastic_nodes()
              for frame in site["cond_indep_stack"] if frame.vectorized]
    return max([1, *(-dim for dim in frames)])


def map_loss(model: Callable, guide: AutoDelta, *args, **kwargs) -> torch.Tensor:
    """−log p(data, point) at an ``AutoDelta`` guide's point: ``Trace_ELBO``'s loss, cheaper.

    For a Delta guide the ELBO's guide term is log q = 0, so the loss is minus the
    model's joint log-density with its latent sites at the guide's point (as Pyro's
    HMC potential energy is computed). The point is read with ``pyro.param``
    instead of tracing the guide, so ``SVI`` still finds and trains the guide's
    parameters; a guide with latent sites inside plates is traced (its plates
    subsample those sites). The model runs once, each site adding its scaled
    log-density as it happens (:class:`_PointLogJoint`: no trace is recorded). The
    tests check the result, and its gradients, equal ``Trace_ELBO().differentiable_loss``.

    For a :class:`~bayes_sws.model.SoftWeightSharingModel` and a plain ``AutoDelta``
    with its parameters on itself (the fit loop's :func:`~bayes_sws.fitting.library_scope`),
    called on ``(x, y)`` outside any Pyro handler, the model is not run at all: the loss
    is :meth:`~bayes_sws.model.SoftWeightSharingModel.log_joint` of the guide's
    parameters, the same density in a few operations.

    Examples
    --------
    >>> loss = map_loss(model, guide, x, y, data_size=60000)
    >>> loss.backward()
    """
    if guide.prototype_trace is None:
        guide(*args, **kwargs)  # creates the guide's parameters
    coordinates = _point_coordinates(model, guide, args, kwargs)
    if coordinates is not None:
        x, y = args
        return -model.log_joint(coordinates, x, y, data_size=kwargs.get("data_size"))
    sites = guide.prototype_trace.nodes
    latent = [name for name, site in sites.items() if site["type"] == "sample" and not site["is_observed"]]
    if any(sites[name]["cond_indep_stack"] for name in latent):
        trace = poutine.trace(guide).get_trace(*args, **kwargs)
        point = {name: site["value"] for name, site in trace.iter_stochastic_nodes()}
    else:
        point = _guide_point(guide, latent, *args, **kwargs)
    joint = _PointLogJoint(point)
    with joint:
        model(*args, **kwargs)
    return -joint.total


_POINT_PARAMETERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""AutoDelta guide → (its prototype trace, the model, site → (module, attribute) of its parameter) where
:func:`_point_coordinates` applies. The places, not the parameters: a guide's parameter can be replaced
(``load_state_dict(assign=True)``, ``setattr``), and each call reads the one it holds now."""


def _point_coordinates(model: Callable, guide: AutoDelta, args: tuple, kwargs: dict) -> dict[str, torch.Tensor] | None:
    """Each latent site's unconstrained parameter in the guide, where :meth:`SoftWeightSharingModel.log_joint` is the loss.

    That is a model whose sites are those of its groups (no likelihood sites), a plain
    ``AutoDelta`` keeping its parameters on itself, weights of real support (their
    parameters are their values), a call ``(x, y, data_size=…)``, no Pyro handler
    around it (``log_joint`` would bypass it), no local reparameterisation and no
    tracing; ``None`` otherwise.
    """
    if not (isinstance(model, SoftWeightSharingModel) and type(guide) is AutoDelta and len(args) == 2
            and args[1] is not None and set(kwargs) <= {"data_size"} and pyro.settings.get("module_local_params")
            and not poutine.runtime.am_i_wrapped() and not torch.jit.is_tracing()
            and active_weight_posterior() is None):
        return None
    cached = _POINT_PARAMETERS.get(guide)
    if cached is None or cached[0] is not guide.prototype_trace or cached[1] is not model:
        cached = (guide.prototype_trace, model, _point_parameters(model, guide))
        _POINT_PARAMETERS[guide] = cached
    places = cached[2]
    if places is None:
        return None
    coordinates = {name: (guide if module is None else module)._parameters.get(attribute)
                   for name, (module, attribute) in places.items()}
    return coordinates if all(isinstance(p, torch.Tensor) for p in coordinates.values()) else None


def _point_parameters(model: SoftWeightSharingModel, guide: AutoDelta
                      ) -> dict[str, tuple[torch.nn.Module | None, str]] | None:
    sites = {name: site for name, site in guide.prototype_trace.iter_stochastic_nodes()}
    if any(site["cond_indep_stack"] for site in sites.values()):
        return None
    like = next(iter(model.network.parameters()))
    expected = {*model.prior_sites, *(f"{group}.{suffix}" for group in model.groups
                                      for suffix in model.prior._site_priors(like))}
    if set(sites) != expected or model.likelihood.initial_values(like=like) \
            or not all(_is_identity(transform_to(sites[name]["fn"].support)) for name in model.prior_sites):
        return None
    parameters = dict(guide.named_parameters())
    places = {}
    for name in sites:
        path, _, attribute = f"{name}_unconstrained".rpartition(".")
        module = guide.get_submodule(path)
        if module._parameters.get(attribute) is not parameters[f"{name}_unconstrained"]:
            return None
        places[name] = (module if path else None, attribute)  # None: the guide itself, not held by its own entry
    return places


class _PointLogJoint(Messenger):
    """Within, latent sites take their values from ``point``, and ``total`` sums every site's scaled log-density.

    What ``poutine.trace(poutine.replay(model, trace)).get_trace(...).log_prob_sum()``
    computes, without recording a trace: a site masked out entirely (``mask=False``,
    or a distribution masked with ``.mask(False)``) adds exactly zero and is skipped.
    """

    def __init__(self, point: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.point = point
        self.total: torch.Tensor | float = 0.0

    def _pyro_sample(self, msg) -> None:
        if not msg["is_observed"] and msg["name"] in self.point:
            msg["value"] = self.point[msg["name"]]
            msg["done"] = True

    def _pyro_post_sample(self, msg) -> None:
        fn, mask = msg["fn"], msg["mask"]
        if mask is False or (isinstance(fn, MaskedDistribution) and fn._mask is False):
            return
        log_p = fn.log_prob(msg["value"], *msg["args"], **msg["kwargs"])
        self.total = self.total + scale_and_mask(log_p, msg["scale"], mask).sum()


def _guide_point(guide: AutoDelta, sites: list[str], *args, **kwargs) -> dict[str, torch.Tensor]:
    """The guide's constrained value of each site, read as Pyro parameters."""
    if pyro.settings.get("module_local_params"):
        return {name: operator.attrgetter(name)(guide) for name in sites}
    names = {name: f"{guide._pyro_name}.{name}" for name in sites}
    try:
        return {name: pyro.param(full) for name, full in names.items()}
    except KeyError:  # the param store was cleared: the guide registers its parameters again
        guide(*args, **kwargs)
        return {name: pyro.param(full) for name, full in names.items()}


def map_guide(model: SoftWeightSharingModel, *, init_values: dict[str, torch.Tensor] | None = None) -> AutoDelta:
    """An ``AutoDelta`` guide starting at ``model.initial_values()``, updated by ``init_values``.

    Parameters
    ----------
    model : SoftWeightSharingModel
    init_values : dict, optional
        Starting values of some or all latent sites.
    """
    values = {**model.initial_values(), **(init_values or {})}
    return AutoDelta(model, init_loc_fn=init_to_value(values=values))


def write_point(guide: AutoDelta, values: dict[str, torch.Tensor]) -> None:
    """Overwrite an ``AutoDelta`` guide's point at some sites, in place (optimiser state stays attached)."""
    parameters = dict(guide.named_parameters())
    with torch.no_grad():
        for site, value in values.items():
            support = guide.prototype_trace.nodes[site]["fn"].support
            parameters[f"{site}_unconstrained"].copy_(transform_to(support).inv(value))


@dataclass
class EMUpdate(Callback):
    """Every ``every`` optimiser steps, one EM update of each mixture with the weights held fixed.

    The update is :meth:`~bayes_sws.prior.SoftWeightSharingPrior.em_update` at the
    guide's current point, written back into the guide.
    """

    every: int

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"EM every {self.every} steps: must be at least 1")

    def on_step(self, state: FitState) -> None:
        if state.step % self.every:
            return
        model, values = state.model, state.values
        updated = {}
        for group, mixture in model.mixtures(values).items():
            new = model.prior.em_update(model.group_weights(values, group), mixture,
                                        prior_weight=model.prior_weight)
            updated.update({f"{group}.{suffix}": v for suffix, v in model.prior.split(new).items()})
        write_point(state.guide, updated)


def fit_map(
    model: SoftWeightSharingModel,
    data: Dataset,
    *,
    epochs: int,
    batch_size: int = 128,
    optimizer: str = "adam",
    learning_rates: LearningRates = LearningRates(),
    iterations_per_epoch: int = 20,
    em_every: int | None = None,
    init_values: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    callbacks: Sequence[Callback] = (),
    state_dict: dict | None = None,
    progress: bool = True,
) -> FitState:
    """Find the MAP point of the model on a dataset; the network ends holding it.

    Parameters
    ----------
    model : SoftWeightSharingModel
    data : Dataset
        On the device the fit should run on. Each epoch's record gets the test
        metrics (``test_nll``, ``test_accuracy`` or ``test_mse``) and, where the
        dataset has a validation split, the same for ``valid``.
    epochs : int
        Passes over the data (Adam) or outer iterations of ``iterations_per_epoch``
        full-batch steps (L-BFGS, CG).
    batch_size : int
        Minibatch size for Adam.
    optimizer : {"adam", "lbfgs", "cg"}
    learning_rates : LearningRates
        Adam's per-group rates (the full-batch methods take none).
    iterations_per_epoch : int
        Full-batch iterations per epoch (L-BFGS, CG).
    em_every : int, optional
        Run an EM update of the mixtures every this many optimiser steps.
    init_values : dict, optional
        Starting values of some or all sites; the others start at
        ``model.initial_values()`` (the network's current weights and the configured
        initial mixture).
    seed : int
        Seeds the fit's own random streams; a fit is reproducible on the same machine.
    callbacks : sequence of Callback
        Run after the evaluation (and EM) callbacks.
    state_dict : dict, optional
        A :meth:`~bayes_sws.fitting.FitState.state_dict` of an earlier fit of the same
        model and settings: the fit continues from it up to ``epochs``.
    progress : bool
        Show a progress bar.

    Returns
    -------
    FitState; ``state.values`` is the MAP point, also copied into ``model.network``.

    Raises
    ------
    FitError
        If the loss becomes non-finite.
    """
    state = start_fit(model, map_guide(model, init_values=init_values), data, loss=map_loss,
                      optimizer=optimizer, learning_rates=learning_rates, batch_size=batch_size,
                      iterations_per_epoch=iterations_per_epoch, seed=seed)
    if state_dict is not None:
        state.load_state_dict(state_dict)
    em = [EMUpdate(em_every)] if em_every else []
    fit(state, data, epochs=epochs, callbacks=[*em, *_evaluations(data), *callbacks], progress=progress)
    model.load_values(state.values)
    return state


# --------------------------------------------------------------------------- variational inference


def vi_guide(
    model: SoftWeightSharingModel,
    *,
    init_values: dict[str, torch.Tensor] | None = None,
    init_scale: float = 1e-2,
    mixture_guide: str = "full",
    weight_guide: str = "diagonal",
) -> AutoGuideList:
    """The variational family: mean-field Normal weights, a multivariate normal over the mixture sites.

    By default (``weight_guide="diagonal"``) part 0 is an ``AutoNormal`` over the prior
    sites (the weights) and part 1 a guide over every other latent site (π, μ, 1/σ²,
    π0, a learned noise scale), all in Pyro's unconstrained coordinates:
    ``AutoMultivariateNormal`` (``"full"``), ``AutoLowRankMultivariateNormal``
    (``"lowrank"``) or ``AutoNormal`` (``"diagonal"``). ``weight_guide="full"`` is
    instead one full-rank ``AutoMultivariateNormal`` over every site jointly, for
    small models (its covariance has (weights + mixture sites)² entries).

    Parameters
    ----------
    model : SoftWeightSharingModel
    init_values : dict, optional
        Locations to start from (e.g. a MAP point), some or all sites; the others
        start at ``model.initial_values()``.
    init_scale : float
        Every site's starting standard deviation, in unconstrained coordinates.
    mixture_guide : {"full", "lowrank", "diagonal"}
    weight_guide : {"diagonal", "full"}

    Returns
    -------
    AutoGuideList
    """
    if mixture_guide not in MIXTURE_GUIDES:
        raise ValueError(f"mixture_guide must be one of {', '.join(MIXTURE_GUIDES)}, got {mixture_guide!r}")
    if not 0 < init_scale < math.inf:
        raise ValueError(f"init_scale must be positive and finite, got {init_scale}")
    if weight_guide not in WEIGHT_GUIDES:
        raise ValueError(f"weight_guide must be one of {', '.join(WEIGHT_GUIDES)}, got {weight_guide!r}")
    init = init_to_value(values={**model.initial_values(), **(init_values or {})})
    # Every site starts at its value, inside the blocks too: flat hyperpriors cannot be sampled.
    started = InitMessenger(init)(model)
    guide = AutoGuideList(started)
    if weight_guide == "full":
        guide.append(AutoMultivariateNormal(started, init_loc_fn=init, init_scale=init_scale))
        return guide
    weights = list(model.prior_sites)
    mixture_family = {"full": AutoMultivariateNormal, "lowrank": AutoLowRankMultivariateNormal,
                      "diagonal": AutoNormal}[mixture_guide]
    guide.append(AutoNormal(poutine.block(started, expose=weights), init_loc_fn=init, init_scale=init_scale))
    guide.append(mixture_family(poutine.block(started, hide=weights), init_loc_fn=init, init_scale=init_scale))
    return guide


def vi_loss(*, num_particles: int = 1, local_reparameterization: bool = False) -> NegativeELBO:
    """The negative ELBO, ``loss(model, guide, x, y, data_size=N)``, with S vectorised particles.

    The prior term has no closed form against a mixture: it is the Monte Carlo
    average of λ·log p(w | π, μ, σ) over the S weight draws, as are the likelihood
    and entropy terms. ``local_reparameterization`` takes the likelihood term from
    sampled pre-activations (:mod:`bayes_sws.local_reparam`). See :class:`NegativeELBO`.
    """
    return NegativeELBO(num_particles=num_particles, local_reparameterization=local_reparameterization)


_PARTICLE_PLATE = "num_particles_vectorized"
_MAX_PLATE_NESTING = 1
"""The model's own plates (``data``); S > 1 particles take the next dimension to the left, as in ``Trace_ELBO``."""
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class NegativeELBO:
    """−ELBO of a guide, ``loss(model, guide, x, y, data_size=N)``: exactly ``Trace_ELBO``'s, cheaper for mean-field weights.

    The rule: a :class:`~bayes_sws.model.SoftWeightSharingModel` with a guide of Pyro's
    reparameterised autoguides (``AutoNormal``, ``AutoDelta``, ``AutoContinuous``, or a
    list of them over disjoint sites), one an ``AutoNormal`` over exactly the model's
    weight sites (:func:`vi_guide`'s default, ``weight_guide="diagonal"``;
    :func:`~bayes_sws.local_reparam.mean_field_part`), takes the lean path below; any
    other pair (``weight_guide="full"``, a hand-written guide or part, a wrapped model, …)
    goes through ``Trace_ELBO(vectorize_particles=True).differentiable_loss``, which
    also adds score-function terms and refuses a site two parts draw.

    The lean path, per step, with S particles drawn at once:

    * each weight site w = m + s·ε, ε ~ N(0, I) drawn straight from the part's
      locations and scales (same order and shapes as the part's own draws), and its
      log q(w) = −Σ log s − ½ Σ ε² − (n/2) log 2π in closed form: the Normal's
      log-density at its own reparameterised draw, in value and in gradient (its
      derivative in m is zero, in s −1/s), without the per-site distribution
      objects, traces and Delta sites of the guide;
    * a multivariate normal part over the mixture sites (``AutoContinuous``: ``"full"``,
      ``"lowrank"``) drawn from its posterior and unpacked as its forward does, log q
      its log-density plus the transforms' log |Jacobian|; any other part traced;
    * the model's scaled log joint at that point summed as it runs
      (:class:`_PointLogJoint`, as :func:`map_loss` does), λ on its prior factor only.

    The loss is (Σ over particles of log q − log p(D, w, θ)) / S: the same draws as
    ``Trace_ELBO`` from the same RNG state, hence the same value and gradients to float
    round-off (``tests/test_vi.py``).

    Parameters
    ----------
    num_particles : int
        S ≥ 1, vectorised.
    local_reparameterization : bool
        Run the model under :func:`~bayes_sws.local_reparam.weight_posterior`, so its
        likelihood term comes from sampled pre-activations; needs the mean-field part.
    """

    def __init__(self, *, num_particles: int = 1, local_reparameterization: bool = False) -> None:
        if num_particles < 1:
            raise ValueError(f"num_particles must be at least 1, got {num_particles}")
        self.num_particles = num_particles
        self.local_reparameterization = local_reparameterization
        self.trace_elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True,
                                     max_plate_nesting=_MAX_PLATE_NESTING)

    def __call__(self, model: SoftWeightSharingModel, guide: AutoGuide, *args, **kwargs) -> torch.Tensor:
        weights = None
        if isinstance(model, SoftWeightSharingModel) and isinstance(guide, AutoGuide):
            if guide.prototype_trace is None:
                guide(*args, **kwargs)  # creates the guide's parameters
            weights = _lean_weights_part(model, guide)
        if weights is None:
            if self.local_reparameterization:
                raise ValueError("local reparameterisation needs the weights under a mean-field AutoNormal guide")
            return self.trace_elbo.differentiable_loss(model, guide, *args, **kwargs)
        return self._lean_loss(model, guide, weights, *args, **kwargs)

    def _particles(self) -> contextlib.AbstractContextManager:
        if self.num_particles == 1:
            return contextlib.nullcontext()
        return pyro.plate(_PARTICLE_PLATE, self.num_particles, dim=-_MAX_PLATE_NESTING - 1)

    def _lean_loss(self, model: SoftWeightSharingModel, guide: AutoGuide, weights: AutoNormal,
                   *args, **kwargs) -> torch.Tensor:
        particles = self.num_particles
        lead = torch.Size((particles, 1) if particles > 1 else ())
        point: dict[str, torch.Tensor] = {}
        posterior: WeightPosterior = {}
        log_q: torch.Tensor | float = 0.0
        for part in guide if isinstance(guide, AutoGuideList) else [guide]:
            if part is weights:
                posterior, values, part_log_q = _mean_field_draw(part, lead)
            elif isinstance(part, AutoContinuous) and not any(part._cond_indep_stacks.values()):
                values, part_log_q = _continuous_draw(part, lead, *args, **kwargs)
            else:
                with self._particles():
                    trace = poutine.trace(part).get_trace(*args, **kwargs)
                values = {name: site["value"] for name, site in trace.iter_stochastic_nodes()}
                part_log_q = trace.log_prob_sum()
            point.update(values)
            log_q = log_q + part_log_q
        joint = _PointLogJoint(point)
        local = weight_posterior(posterior) if self.local_reparameterization else contextlib.nullcontext()
        with local, self._particles(), joint:
            model(*args, **kwargs)
        return (log_q - joint.total) / particles


_REPARAMETERIZED_PARTS = (AutoNormal, AutoDelta, AutoContinuous)
"""Pyro's autoguides whose every draw is reparameterised (no score-function term in the gradient)."""


def _lean_weights_part(model: SoftWeightSharingModel, guide: AutoGuide) -> AutoNormal | None:
    """The guide's mean-field weights part where the lean loss is ``Trace_ELBO``'s, else ``None``.

    Every part must be one of :data:`_REPARAMETERIZED_PARTS`, set up, and the parts' sites disjoint.
    """
    parts = list(guide) if isinstance(guide, AutoGuideList) else [guide]
    if not all(isinstance(part, _REPARAMETERIZED_PARTS) and part.prototype_trace is not None for part in parts):
        return None
    sites = [name for part in parts for name, _ in part.prototype_trace.iter_stochastic_nodes()]
    if len(sites) != len(set(sites)):
        return None
    return mean_field_part(guide, model.prior_sites)


def _mean_field_draw(part: AutoNormal, lead: torch.Size) -> tuple[WeightPosterior, dict[str, torch.Tensor],
                                                                   torch.Tensor]:
    """An ``AutoNormal`` part's draw of its real-valued sites, ``(*lead, *site_shape)``, and its log q, in closed form.

    Returns
    -------
    The sites' (location, scale), the draws, and log q summed over every site and draw.
    """
    with part._pyro_context:  # read as the part's forward reads them (Pyro's param store outside library_scope)
        posterior = {name: part._get_loc_and_scale(name) for name in part._event_dims}
    values: dict[str, torch.Tensor] = {}
    log_q: torch.Tensor | float = 0.0
    noise_squares: torch.Tensor | float = 0.0
    count = 0
    for name, (loc, scale) in posterior.items():
        noise = torch.empty(lead + loc.shape, dtype=loc.dtype, device=loc.device).normal_()
        values[name], log_scale_sum = _MeanFieldDraw.apply(loc, scale, noise)
        log_q = log_q - lead.numel() * log_scale_sum
        flat = noise.reshape(-1)
        noise_squares = noise_squares + flat.dot(flat)
        count += flat.numel()
    return posterior, values, log_q - 0.5 * noise_squares - count * _HALF_LOG_2PI


def _continuous_draw(part: AutoContinuous, lead: torch.Size, *args, **kwargs) -> tuple[dict[str, torch.Tensor],
                                                                                        torch.Tensor]:
    """An ``AutoContinuous`` part's draw of its sites and its log q, as its forward and a trace's log-density give them.

    One draw of the joint latent from the part's posterior (``(*lead, D)``, its own
    shapes under the particle plate), unpacked and transformed site by site; log q is
    the latent's log-density plus each transform's log |Jacobian| (the part's Delta
    sites), without recording a trace.
    """
    with part._pyro_context:
        posterior = part.get_posterior(*args, **kwargs)
    latent = posterior.rsample(lead)
    log_q = posterior.log_prob(latent).sum()
    values = {}
    for site, unconstrained in part._unpack_latent(latent):
        transform = biject_to(site["fn"].support)
        values[site["name"]] = value = transform(unconstrained)
        log_q = log_q + transform.inv.log_abs_det_jacobian(value, unconstrained).sum()
    return values, log_q


class _MeanFieldDraw(torch.autograd.Function):
    """w = m + s·ε (ε ``(*particles, *shape)``, m and s ``shape``) and Σ log s, with their exact gradients.

    Two passes over the weights forward and two backward, where autograd's graph of
    ``loc + noise * scale`` and ``scale.log().sum()`` takes three and three.
    """

    @staticmethod
    def forward(loc: torch.Tensor, scale: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.addcmul(loc, noise, scale), scale.log().sum()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, scale, noise = inputs
        ctx.save_for_backward(scale, noise)

    @staticmethod
    def backward(ctx, grad_draw: torch.Tensor, grad_log_scale_sum: torch.Tensor):
        scale, noise = ctx.saved_tensors
        particles = tuple(range(noise.dim() - scale.dim()))
        grad_loc = grad_draw.sum(particles) if particles else grad_draw
        grad_scale = grad_draw * noise
        if particles:
            grad_scale = grad_scale.sum(particles)
        return grad_loc, grad_scale.addcdiv_(grad_log_scale_sum.expand_as(scale), scale), None


def fit_vi(
    model: SoftWeightSharingModel,
    data: Dataset,
    *,
    epochs: int,
    batch_size: int = 128,
    learning_rates: LearningRates = LearningRates(),
    num_particles: int = 1,
    init_values: dict[str, torch.Tensor] | None = None,
    init_scale: float = 1e-2,
    mixture_guide: str = "full",
    weight_guide: str = "diagonal",
    local_reparameterization: bool = False,
    seed: int = 0,
    callbacks: Sequence[Callback] = (),
    state_dict: dict | None = None,
    progress: bool = True,
) -> FitState:
    """Fit :func:`vi_guide` to the model's posterior by maximising the ELBO with Adam.

    The objective, per minibatch, is the negative of

        E_q[(N/B) Σ_batch log p(y | x, w)] + E_q[λ log p(w | π, μ, σ) + log p(π, μ, σ)] + H[q]

    with each expectation a Monte Carlo average over ``num_particles`` vectorised
    draws; λ scales the prior's log-density, not the entropy (docs/objective.md §7).

    Parameters
    ----------
    model : SoftWeightSharingModel
    data : Dataset
        Each epoch's record gets the validation and test metrics at the guide's median.
    epochs : int
    batch_size : int
    learning_rates : LearningRates
        Adam's rates: the weights' locations and scales take ``weights``; the
        ``AutoNormal`` parts of the mixture sites their own group's rate; a
        multivariate mixture guide (one joint location and scale) the slowest of
        ``means``, ``precisions`` and ``pi`` (:attr:`LearningRates.mixture`).
    num_particles : int
        S ≥ 1 draws per step, vectorised.
    init_values : dict, optional
        Starting locations, typically a MAP point (``fit_map(...).values``).
    init_scale : float
        Starting standard deviation of every site (unconstrained coordinates).
    mixture_guide : {"full", "lowrank", "diagonal"}
    weight_guide : {"diagonal", "full"}
        See :func:`vi_guide`.
    local_reparameterization : bool
        The likelihood from sampled pre-activations (Linear and Conv2d layers only;
        needs ``weight_guide="diagonal"``).
    seed : int
    callbacks : sequence of Callback
    state_dict : dict, optional
        An earlier VI fit's :meth:`~bayes_sws.fitting.FitState.state_dict`: continue it.
    progress : bool

    Returns
    -------
    FitState; ``state.guide`` is the fitted guide (draw from it with
    :func:`sample_guide`), ``state.values`` its median, also copied into the network.

    Raises
    ------
    FitError
        If the loss becomes non-finite.
    """
    if local_reparameterization:
        check_local_layers(model.network, model.prior_sites)
    if local_reparameterization and weight_guide != "diagonal":
        raise ValueError("local reparameterisation needs the mean-field weight guide (weight_guide='diagonal')")
    guide = vi_guide(model, init_values=init_values, init_scale=init_scale, mixture_guide=mixture_guide,
                     weight_guide=weight_guide)
    loss = vi_loss(num_particles=num_particles, local_reparameterization=local_reparameterization)
    state = start_fit(model, guide, data, loss=loss, optimizer="adam", learning_rates=learning_rates,
                      batch_size=batch_size, seed=seed)
    if state_dict is not None:
        state.load_state_dict(state_dict)
    fit(state, data, epochs=epochs, callbacks=[*_evaluations(data), *callbacks], progress=progress)
    model.load_values(state.values)
    return state


def _evaluations(data: Dataset) -> list[Evaluate]:
    splits = {"valid": (data.valid_x, data.valid_y), "test": (data.test_x, data.test_y)}
    return [Evaluate(name, x, y) for name, (x, y) in splits.items() if x is not None and len(x)]


# --------------------------------------------------------------------------- NUTS


def fit_nuts(
    model: SoftWeightSharingModel,
    data: Dataset,
    *,
    num_chains: int = 2,
    warmup_steps: int = 200,
    num_samples: int = 200,
    init_values: dict[str, torch.Tensor] | None = None,
    max_tree_depth: int = 8,
    target_accept_prob: float = 0.8,
    seed: int = 0,
    progress: bool = True,
) -> PosteriorSamples:
    """Sample the posterior with NUTS: the same model function, the whole training set, no subsampling.

    The chains run one after another, chain ``c`` seeded with ``seed + c`` (a forked
    RNG), each from ``init_values`` (a MAP point, say), with step size and a diagonal
    mass matrix adapted during warm-up. Pass-through parameters (biases without the
    prior, …) stay fixed at the network's values.

    Parameters
    ----------
    model : SoftWeightSharingModel
        At most :data:`NUTS_MAX_WEIGHTS` weights under the prior; every latent site
        needs a proper prior (hyperpriors on all mixture sites).
    data : Dataset
    num_chains, warmup_steps, num_samples : int
    init_values : dict, optional
        Starting values; the others start at ``model.initial_values()``.
    max_tree_depth : int
        At most 2**max_tree_depth − 1 leapfrog steps per draw.
    target_accept_prob : float
        Step-size adaptation's target.
    seed : int
    progress : bool

    Returns
    -------
    PosteriorSamples (method ``"nuts"``), ``samples[site]`` ``(num_chains, num_samples, *site_shape)``;
    ``sample_stats``: ``diverging`` (bool), ``potential_energy``, ``step_size`` and
    ``acceptance_rate`` (the draw's mean Metropolis acceptance over its tree), each
    ``(num_chains, num_samples)``. Pyro's NUTS does not expose the tree depth.

    Raises
    ------
    BayesSWSError
        If the network is too large or a site has an improper prior.
    """
    if min(num_chains, warmup_steps, num_samples) < 1:
        raise ValueError("num_chains, warmup_steps and num_samples must be at least 1")
    values = {**model.initial_values(), **(init_values or {})}
    check_nuts(model, data, init_values=values)
    x, y = data.train_x, data.train_y
    device = x.device
    chains = []
    with _frozen(model.network):
        for chain in range(num_chains):
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                    pyro.validation_enabled(False):
                torch.manual_seed(seed + chain)
                chains.append(_run_chain(model, x, y, values=values, warmup_steps=warmup_steps,
                                         num_samples=num_samples, max_tree_depth=max_tree_depth,
                                         target_accept_prob=target_accept_prob, progress=progress))
    samples = {name: torch.stack([c[0][name] for c in chains]) for name in chains[0][0]}
    stats = {name: torch.stack([c[1][name] for c in chains]) for name in chains[0][1]}
    return PosteriorSamples(method="nuts", samples=samples, sample_stats=stats)


def check_nuts(model: SoftWeightSharingModel, data: Dataset, *,
               init_values: dict[str, torch.Tensor] | None = None) -> None:
    """Refuse a model NUTS cannot sample: too many weights, or a site with a flat prior.

    :func:`fit_nuts` runs it first; ``run()`` runs it before a NUTS run's MAP fit.

    Raises
    ------
    BayesSWSError
        Naming the limit, or the flat sites.
    """
    if model.n_weights > NUTS_MAX_WEIGHTS:
        raise BayesSWSError(f"NUTS is for small networks: {model.n_weights} weights under the prior, "
                            f"at most {NUTS_MAX_WEIGHTS}; use method = \"vi\"")
    x, y, n = data.train_x, data.train_y, data.train_x.shape[0]
    values = {**model.initial_values(), **(init_values or {})}
    with library_scope(), torch.no_grad():
        sites = poutine.trace(InitMessenger(init_to_value(values=values))(model)).get_trace(x[:1], y[:1], data_size=n)
    improper = [name for name, site in sites.iter_stochastic_nodes()
                if isinstance(site["fn"], pyro.distributions.ImproperUniform)]
    if improper:
        raise BayesSWSError(f"NUTS needs proper priors on every site; flat: {', '.join(improper)} "
                            "(set [prior.hyperpriors], and prior.weight > 0)")


@contextlib.contextmanager
def _frozen(network: torch.nn.Module):
    """The network's own parameters as constants for the duration (NUTS's traced potential takes them as such)."""
    trainable = [p for p in network.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)


def _run_chain(model, x, y, *, values, warmup_steps, num_samples, max_tree_depth, target_accept_prob,
               progress) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    kernel = NUTS(model, init_strategy=init_to_value(values=values), max_tree_depth=max_tree_depth,
                  target_accept_prob=target_accept_prob, max_plate_nesting=1, jit_compile=True,
                  ignore_jit_warnings=True)
    records: dict[str, list] = {"diverging": [], "potential_energy": [], "step_size": [], "acceptance_rate": []}
    seen = {"divergences": 0, "mean_accept": 0.0}

    def record(kernel, params, stage, i) -> None:
        if not stage.startswith("Sample"):
            return
        n = i + 1  # the kernel keeps a running mean of acceptance over the drawing phase
        mean = kernel._mean_accept_prob
        records["acceptance_rate"].append(n * mean - (n - 1) * seen["mean_accept"])
        seen["mean_accept"] = mean
        records["diverging"].append(len(kernel._divergences) > seen["divergences"])
        seen["divergences"] = len(kernel._divergences)
        records["potential_energy"].append(float(kernel._potential_energy_last))
        records["step_size"].append(float(kernel.step_size))

    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps, num_chains=1,
                disable_progbar=not progress, hook_fn=record)
    mcmc.run(x, y, data_size=x.shape[0])
    samples = {name: value.detach() for name, value in mcmc.get_samples().items()}
    stats = {name: torch.tensor(value, device=x.device) for name, value in records.items()}
    return samples, stats
