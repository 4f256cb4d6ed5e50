"""MAP fitting: an ``AutoDelta`` guide and :func:`map_loss` in the one fit loop (:mod:`bayes_sws.fitting`).

With a Delta guide the ELBO's entropy term is zero, so the loss is exactly
E(w) + λΩ(w) − log p(π, μ, 1/σ²) (docs/objective.md), minimised by

* ``"adam"``: minibatch steps (N/B-scaled likelihood), one learning rate per
  parameter group (weights, means, precisions, mixing proportions);
* ``"lbfgs"`` and ``"cg"``: full-batch iterations;
* optionally an EM update of the mixtures, weights held fixed, every few steps
  (:class:`EMUpdate`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoDelta, AutoGuide, AutoGuideList, init_to_value
from torch.distributions import transform_to

from .data import Dataset
from .fitting import Callback, Evaluate, FitState, fit, library_scope, start_fit
from .model import SoftWeightSharingModel
from .optim import LearningRates

__all__ = ["EMUpdate", "PosteriorSamples", "fit_map", "map_guide", "map_loss", "sample_guide", "write_point"]


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
    model's joint log-density with its latent sites replayed at the guide's point
    (as Pyro's HMC potential energy is computed). The point is read with
    ``pyro.param`` instead of tracing the guide, so ``SVI`` still finds and trains
    the guide's parameters; a guide with latent sites inside plates is traced (its
    plates subsample those sites). The tests check the result equals
    ``Trace_ELBO().differentiable_loss``.

    Examples
    --------
    >>> loss = map_loss(model, guide, x, y, data_size=60000)
    >>> loss.backward()
    """
    if guide.prototype_trace is None:
        guide(*args, **kwargs)  # creates the guide's parameters
    sites = dict(guide.prototype_trace.iter_stochastic_nodes())
    if any(site["cond_indep_stack"] for site in sites.values()):
        point = poutine.trace(guide).get_trace(*args, **kwargs)
    else:
        point = poutine.Trace()
        for name, value in _guide_point(guide, list(sites), *args, **kwargs).items():
            point.add_node(name, type="sample", value=value, is_observed=False, infer={})
    return -poutine.trace(poutine.replay(model, trace=point)).get_trace(*args, **kwargs).log_prob_sum()


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
    splits = {"valid": (data.valid_x, data.valid_y), "test": (data.test_x, data.test_y)}
    evaluations = [Evaluate(name, x, y) for name, (x, y) in splits.items() if x is not None and len(x)]
    em = [EMUpdate(em_every)] if em_every else []
    fit(state, data, epochs=epochs, callbacks=[*em, *evaluations, *callbacks], progress=progress)
    model.load_values(state.values)
    return state
