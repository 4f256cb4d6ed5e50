"""Turning a torch network into a Pyro model whose weights carry the mixture prior.

:class:`SoftWeightSharingModel` is one model function for MAP, variational
inference and NUTS:

    mixture sites (π, μ, 1/σ², hyperpriors)      one group, or one per layer
    weight sites  w ~ MixturePrior, masked       (draws and support; no density per site)
    group prior   factor "<group>.prior"         λ·log p(all the group's weights | mixture)
    pass-through parameters                      the network's own (point estimates)
    likelihood    inside ``plate("data", N, subsample=batch)``: scaled by N/B

With an ``AutoDelta`` guide and ``Trace_ELBO`` its loss is exactly
E(w) + λΩ(w) − log p(π, μ, 1/σ²).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn
from torch.distributions import constraints
from torch.nn.utils import parametrize, stateless

from .local_reparam import active_weight_posterior, local_outputs
from .prior import GaussianMixture, MixturePrior, SoftWeightSharingPrior, mixture_log_prob_sum

__all__ = [
    "Categorical",
    "Gaussian",
    "Likelihood",
    "PRIOR_TERM",
    "SHARED_GROUP",
    "SoftWeightSharingModel",
    "group_log_prob",
    "prior_parameter_names",
]

SHARED_GROUP = "mixture"
PRIOR_TERM = "prior"
"""Suffix of a group's prior factor site: ``"mixture.prior"`` holds λ·log p(weights | mixture)."""
_PRIOR_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_MODEL_NAMES = itertools.count()


class Likelihood:
    """How the network's outputs explain the targets. Subclasses implement :meth:`distribution` and :meth:`scores`."""

    task: str

    def distribution(self, outputs: torch.Tensor) -> dist.Distribution:
        """The observation distribution given network outputs, batch shape ``(B,)``."""
        raise NotImplementedError

    def scores(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each score summed over the batch (outputs ``(B, …)``, targets ``(B,)``); callers divide by B."""
        raise NotImplementedError

    def initial_values(self, *, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """Starting values of the likelihood's own sample sites."""
        return {}

    def log_prob_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Σ over the batch of log p(y | outputs), outputs ``(B, …)``, targets ``(B,)``: ``distribution``'s, summed."""
        return self.distribution(outputs).log_prob(targets).sum()


@dataclass(frozen=True)
class Categorical(Likelihood):
    """Classification: y ~ Categorical(logits = network(x)); outputs ``(B, C)``. Scores: ``accuracy``."""

    task = "classification"

    def distribution(self, outputs: torch.Tensor) -> dist.Distribution:
        return dist.Categorical(logits=outputs)

    def scores(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"accuracy": (outputs.argmax(-1) == targets).sum()}

    def log_prob_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # one fused log-softmax and gather, where the distribution normalises its logits first
        return -torch.nn.functional.cross_entropy(outputs, targets, reduction="sum")


@dataclass(frozen=True)
class Gaussian(Likelihood):
    """Regression: y ~ Normal(network(x), s²); outputs ``(B,)`` or ``(B, 1)``. Scores: ``mse``.

    Attributes
    ----------
    noise_scale : float, optional
        Fixed s; ``None`` learns it as the site ``noise_scale`` with the proper prior
        s ~ HalfNormal(``noise_prior_scale``), so ``Predictive`` and NUTS can sample it.
    noise_prior_scale : float
        Scale of the half-normal prior on a learned s.
    init_noise_scale : float
        Starting s when learned.
    """

    noise_scale: float | None = None
    noise_prior_scale: float = 1.0
    init_noise_scale: float = 0.1
    task = "regression"

    def __post_init__(self) -> None:
        for name in ("noise_scale", "noise_prior_scale", "init_noise_scale"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise ValueError(f"{name} must be positive and finite, got {value}")

    def distribution(self, outputs: torch.Tensor) -> dist.Distribution:
        if self.noise_scale is None:
            scale = pyro.sample("noise_scale", dist.HalfNormal(outputs.new_tensor(self.noise_prior_scale)))
        else:
            scale = self.noise_scale
        # outputs (..., B, 1) or (..., B), the leading dimensions from vectorised draws
        location = outputs[..., 0] if outputs.dim() > 1 and outputs.shape[-1] == 1 else outputs
        return dist.Normal(location, scale)

    def scores(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mse": ((outputs.reshape(-1) - targets) ** 2).sum()}

    def initial_values(self, *, like: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.noise_scale is not None:
            return {}
        return {"noise_scale": like.new_tensor(self.init_noise_scale)}


def prior_parameter_names(network: nn.Module, *, include_biases: bool = False) -> list[str]:
    """Names of the parameters that get the mixture prior.

    The trainable weights (and optionally biases) of Linear and Conv layers; every
    other parameter passes through as a plain point estimate, and a frozen one
    (``requires_grad=False``) stays as it is.
    """
    kinds = ("weight", "bias") if include_biases else ("weight",)
    chosen = {
        id(getattr(module, kind))
        for module in network.modules()
        if isinstance(module, _PRIOR_LAYERS)
        for kind in kinds
        if getattr(module, kind, None) is not None and getattr(module, kind).requires_grad
    }
    # named_parameters() lists a tied parameter once, under its first name.
    return [name for name, parameter in network.named_parameters() if id(parameter) in chosen]


def group_log_prob(
    weights: Sequence[torch.Tensor], mixture: GaussianMixture, *, event_shapes: Sequence[torch.Size]
) -> torch.Tensor:
    """log p(w | mixture) of all the weight tensors one mixture models: the group's prior term, −Ω.

    Parameters
    ----------
    weights : sequence of Tensor
        Tensor t of shape ``(*batch, *event_shapes[t])``, usually one ``batch`` for all
        (e.g. ``(S, 1)`` for vectorised particles, or none): then one kernel call.
    mixture : GaussianMixture with fields of shape ``(*batch_m, J)``
        ``batch_m`` broadcasts against ``batch``.
    event_shapes : sequence of torch.Size
        Each tensor's own shape (the site's shape).

    Returns
    -------
    Tensor of shape ``broadcast(batch, batch_m)``: the sum over every weight of every tensor
    (tensors of different ``batch``, one site conditioned on several draws beside single
    values, broadcast: :func:`~bayes_sws.prior.mixture_log_prob_sum`).
    """
    return mixture_log_prob_sum(list(weights), mixture, event_dim=[len(shape) for shape in event_shapes])


class _GroupPriorFactor(dist.Unit):
    """A group's factor site: ``pyro.factor``'s ``Unit`` whose log-factor is :func:`group_log_prob`, computed when asked.

    A model run that needs no density (``Predictive``, an evaluation, a guide's
    set-up) never evaluates the prior; ``log_prob`` (a trace's, the MAP loss's, the
    ELBO's, NUTS's potential) computes it on each call. Its values hold no data, shape
    ``(*batch_shape, 0)``.

    Parameters
    ----------
    weights, mixture, event_shapes
        As :func:`group_log_prob` takes them.
    batch_shape : torch.Size, optional
        One ``broadcast(batch, batch_m)`` broadcasts to; by default that shape.
    """

    def __init__(self, weights: Sequence[torch.Tensor], mixture: GaussianMixture, *,
                 event_shapes: Sequence[torch.Size], batch_shape: torch.Size | None = None) -> None:
        self.weights, self.mixture, self.event_shapes = list(weights), mixture, list(event_shapes)
        own = torch.broadcast_shapes(*(w.shape[: w.dim() - len(shape)] for w, shape in zip(weights, event_shapes)),
                                     mixture.batch_shape)
        # not Unit.__init__, which takes the log-factor itself; unvalidated, so nothing reads it here
        dist.TorchDistribution.__init__(self, own if batch_shape is None else torch.Size(batch_shape),
                                        torch.Size((0,)), validate_args=False)

    @property
    def log_factor(self) -> torch.Tensor:
        """log p(all the group's weights | mixture), shape ``batch_shape``."""
        log_prob = group_log_prob(self.weights, self.mixture, event_shapes=self.event_shapes)
        return log_prob.expand(self.batch_shape)

    def expand(self, batch_shape, _instance=None) -> _GroupPriorFactor:
        return _GroupPriorFactor(self.weights, self.mixture, event_shapes=self.event_shapes, batch_shape=batch_shape)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        return self.weights[0].new_empty(sample_shape + self.shape())

    rsample = sample

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self.log_factor.expand(torch.broadcast_shapes(self.batch_shape, value.shape[:-1]))


class SoftWeightSharingModel:
    """A Pyro model: a network whose chosen parameters have a soft weight-sharing prior.

    Parameters
    ----------
    network : nn.Module
        Any torch network; its current parameters are the starting values.
    prior : SoftWeightSharingPrior
    likelihood : Likelihood
    prior_weight : float
        λ ≥ 0, the weight of the prior term (0 drops it: plain maximum likelihood).
    include_biases : bool
        Give biases the prior too.
    shared : bool
        One mixture for all prior parameters (group ``"mixture"``), or one per
        parameter tensor (group ``"mixture.<name>"``).

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    >>> model = SoftWeightSharingModel(net, prior=SoftWeightSharingPrior(n_components=8),
    ...                                likelihood=Categorical(), prior_weight=1e-3)
    >>> guide = pyro.infer.autoguide.AutoDelta(model, init_loc_fn=
    ...     pyro.infer.autoguide.init_to_value(values=model.initial_values()))
    """

    def __init__(
        self,
        network: nn.Module,
        *,
        prior: SoftWeightSharingPrior,
        likelihood: Likelihood,
        prior_weight: float = 1.0,
        include_biases: bool = False,
        shared: bool = True,
    ) -> None:
        if not 0 <= prior_weight < math.inf:
            raise ValueError(f"prior_weight (λ) must be non-negative and finite, got {prior_weight}")
        self.network = network
        self.prior = prior
        self.likelihood = likelihood
        self.prior_weight = float(prior_weight)
        self.shared = shared
        self.prior_sites = prior_parameter_names(network, include_biases=include_biases)
        if not self.prior_sites:
            raise ValueError("the network has no Linear or Conv weights to put the prior on")
        self._shapes = {name: p.shape for name, p in network.named_parameters()}
        self.passthrough = [name for name in self._shapes if name not in self.prior_sites]
        self._scope = f"bayes_sws.model{next(_MODEL_NAMES)}"
        self._slots: tuple[nn.Module, dict[str, list[tuple[nn.Module, str]]] | None] | None = None

    # ---- structure

    @property
    def groups(self) -> dict[str, list[str]]:
        """Mixture group name → the parameter sites it models."""
        if self.shared:
            return {SHARED_GROUP: list(self.prior_sites)}
        return {f"{SHARED_GROUP}.{name}": [name] for name in self.prior_sites}

    @property
    def n_weights(self) -> int:
        """Number of scalar parameters under the prior."""
        return sum(self._shapes[name].numel() for name in self.prior_sites)

    def group_weights(self, values: dict[str, torch.Tensor], group: str) -> torch.Tensor:
        """All weights a mixture group models, flattened into one vector ``(N_group,)``."""
        return torch.cat([values[name].reshape(-1) for name in self.groups[group]])

    def initial_values(self) -> dict[str, torch.Tensor]:
        """Starting values of every sample site: the network's weights, the initial mixtures."""
        parameters = dict(self.network.named_parameters())
        values = {name: parameters[name].detach().clone() for name in self.prior_sites}
        for group in self.groups:
            mixture = self.prior.initial_mixture(self.group_weights(values, group))
            values.update(
                {f"{group}.{suffix}": v for suffix, v in self.prior.split(mixture).items()}
            )
        like = next(iter(values.values()))
        values.update(self.likelihood.initial_values(like=like))
        return values

    def mixtures(self, values: dict[str, torch.Tensor]) -> dict[str, GaussianMixture]:
        """Each group's mixture from site values: a MAP point, one posterior draw, or draws along leading dims.

        Site values with leading dimensions ``batch`` give mixtures with fields ``(*batch, J)``.
        """
        like = values[self.prior_sites[0]]
        return {group: self.prior.assemble(_mixture_sites(values, group), like=like) for group in self.groups}

    def load_values(self, values: dict[str, torch.Tensor]) -> nn.Module:
        """Copy site values into the network's parameters (in place) and return it."""
        parameters = dict(self.network.named_parameters())
        with torch.no_grad():
            for name, value in values.items():
                if name in parameters:
                    parameters[name].copy_(value)
        return self.network

    # ---- the model function

    def __call__(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        data_size: int | None = None,
    ) -> torch.Tensor:
        """Run the generative model on a batch.

        Parameters
        ----------
        x : Tensor of shape ``(B, *input_shape)``
        y : Tensor of shape ``(B,)``, optional
            Observed targets; ``None`` samples them.
        data_size : int, optional
            N, the full training set size: the batch's log-likelihood is scaled
            by N/B. Defaults to B.

        Returns
        -------
        Tensor, the network outputs ``(B, …)``.
        """
        parameters = {}
        for group, names in self.groups.items():
            mixture = self.prior.sample_mixture(group, like=x)
            with poutine.scale(scale=self.prior_weight or 1.0):
                for name in names:
                    parameters[name] = pyro.sample(name, self._weight_site(mixture, self._shapes[name]))
                if self.prior_weight:
                    term = _GroupPriorFactor([parameters[name] for name in names], mixture,
                                            event_shapes=[self._shapes[name] for name in names])
                    pyro.sample(f"{group}.{PRIOR_TERM}", term, obs=term.sample(), infer={"is_auxiliary": True})
        if not pyro.settings.get("module_local_params"):
            # Pyro's own SVI finds parameters in the global param store: register the
            # network's trainable pass-through parameters there (the tensors themselves,
            # not copies), under this model's own name.
            network_parameters = dict(self.network.named_parameters())
            for name in self.passthrough:
                if network_parameters[name].requires_grad:
                    pyro.param(f"{self._scope}.{name}", network_parameters[name])
        local = active_weight_posterior()
        if local is None:
            outputs = self.outputs(parameters, x)
        else:  # the likelihood from sampled pre-activations; the weight draws serve the prior only
            outputs = local_outputs(self.network, local, x, particles=self._particle_shape(parameters))
        batch = x.shape[0]
        observation = self.likelihood.distribution(outputs)
        with pyro.plate("data", data_size or batch, subsample=torch.arange(batch, device=x.device)):
            pyro.sample("y", observation, obs=y)
        return outputs

    def log_joint(self, coordinates: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, *,
                  data_size: int | None = None) -> torch.Tensor:
        """log p(y, point | x): the model's joint log-density at a point, without running it under Pyro.

        What running the model with its latent sites at the point sums (each site's
        scaled log-density, as :func:`~bayes_sws.inference.map_loss` does), equal to
        round-off, in a few operations: the likelihood of the batch scaled by N/B, then
        each group through :meth:`~bayes_sws.prior.SoftWeightSharingPrior.group_log_joint`
        (the network first reads the weights the optimiser has just written, while they
        are in cache). For a model whose likelihood has no sites of its own (a learned
        noise scale has one).

        Parameters
        ----------
        coordinates : dict of str to Tensor
            Every latent site → its unconstrained coordinates (``AutoDelta``'s
            parameters): the weights themselves (their support is the real line), and
            ``transform_to(support)`` of the mixture sites' coordinates their values.
        x : Tensor of shape ``(B, *input_shape)``
        y : Tensor of shape ``(B,)``
        data_size : int, optional
            N; defaults to B.

        Returns
        -------
        Tensor of shape ``()``.
        """
        if self.likelihood.initial_values(like=x):
            raise ValueError("log_joint needs a likelihood without sites of its own; run the model under Pyro")
        outputs = self.outputs({name: coordinates[name] for name in self.prior_sites}, x)
        batch = x.shape[0]
        total = (data_size or batch) / batch * self.likelihood.log_prob_sum(outputs, y)
        for group, names in self.groups.items():
            total = total + self.prior.group_log_joint([coordinates[name] for name in names],
                                                       _mixture_sites(coordinates, group),
                                                       prior_weight=self.prior_weight)
        return total

    def outputs(self, parameters: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The network on ``x`` once per set of prior-site values: outputs ``(*particles, B, …)``.

        ``parameters`` maps each prior site (``model.prior_sites``) to its value, of shape
        ``site_shape`` (one network) or ``(S, *site_shape)`` (S draws at once, e.g. posterior
        draws for a predictive); other parameters are the network's own.

        Prior sites sampled in an outer plate arrive with leading dimensions: vectorised
        ELBO particles give ``(S, 1, *shape)`` (the 1 is the data plate's dimension),
        ``Predictive(parallel=True)`` with a guide gives ``(S, *shape)``. The network then
        runs under ``torch.func.vmap`` over those draws, pass-through parameters shared.
        """
        if torch.jit.is_tracing():
            # functional_call refuses to run under the tracer (NUTS with jit_compile=True);
            # this is the context it runs the network in.
            with stateless._reparametrize_module(self.network, parameters, tie_weights=True):
                return self.network(x)
        leading = self._leading_shape(parameters)
        if not leading:
            slots = self._parameter_slots()
            if slots is None:
                return torch.func.functional_call(self.network, parameters, (x,))
            with _swapped(slots, parameters):
                return self.network(x)
        particles = self._particle_shape(parameters)
        batched = {name: parameters[name].expand(leading + self._shapes[name]).reshape(-1, *self._shapes[name])
                   for name in self.prior_sites}

        def network(draw: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.func.functional_call(self.network, draw, (x,))  # pass-through parameters shared

        outputs = torch.func.vmap(network)(batched)
        return outputs.reshape(particles + outputs.shape[1:])

    def _parameter_slots(self) -> dict[str, list[tuple[nn.Module, str]]] | None:
        """Each prior site's places in the network (module, attribute), a tied parameter's every alias.

        ``None`` where a module is parametrised (``torch.nn.utils.parametrize``): then
        ``functional_call`` puts the values in. Otherwise :func:`_swapped` does, as
        ``functional_call`` would, without its per-call search of the module tree.
        """
        network = self.network
        if self._slots is None or self._slots[0] is not network:  # computed for the network in place now
            if any(parametrize.is_parametrized(module) for module in network.modules()):
                self._slots = (network, None)
            else:
                parameters = dict(network.named_parameters())
                places: dict[str, list[tuple[nn.Module, str]]] = {name: [] for name in self.prior_sites}
                by_identity = {id(parameters[name]): name for name in self.prior_sites}
                for name, parameter in network.named_parameters(remove_duplicate=False):
                    if id(parameter) in by_identity:
                        path, _, attribute = name.rpartition(".")
                        places[by_identity[id(parameter)]].append((network.get_submodule(path), attribute))
                self._slots = (network, places)
        return self._slots[1]

    def _leading_shape(self, parameters: dict[str, torch.Tensor]) -> torch.Size:
        if all(parameters[name].shape == self._shapes[name] for name in self.prior_sites):
            return torch.Size()  # one network: torch.broadcast_shapes takes some 30 µs to say so
        return torch.broadcast_shapes(
            *(parameters[name].shape[: parameters[name].dim() - len(self._shapes[name])] for name in self.prior_sites)
        )

    def _particle_shape(self, parameters: dict[str, torch.Tensor]) -> torch.Size:
        """The draws the prior sites' leading dimensions stand for (a trailing data-plate 1 dropped)."""
        leading = self._leading_shape(parameters)
        return leading[:-1] if leading and leading[-1] == 1 else leading

    def _weight_site(self, mixture: GaussianMixture, shape: torch.Size) -> dist.Distribution:
        """A weight site's distribution: it draws from the prior, its density is the group's factor."""
        if self.prior_weight == 0:
            # λ = 0 is maximum likelihood: a flat prior, not a mixture evaluated and masked.
            return dist.ImproperUniform(constraints.independent(constraints.real, len(shape)), (), shape)
        return MixturePrior(mixture, event_shape=shape).mask(False)


_SUFFIXES = ("means", "precisions", "pi", "pi_zero")


def _mixture_sites(values: dict[str, torch.Tensor], group: str) -> dict[str, torch.Tensor]:
    """A group's mixture sites among site values (or coordinates), keyed by suffix: ``{"means": …, …}``."""
    prefix = group + "."
    return {key[len(prefix):]: value for key, value in values.items()
            if key.startswith(prefix) and key[len(prefix):] in _SUFFIXES}


@contextlib.contextmanager
def _swapped(slots: dict[str, list[tuple[nn.Module, str]]], values: dict[str, torch.Tensor]):
    """The network's parameters at ``slots`` replaced by ``values`` (by site name) for the duration."""
    saved = []
    try:
        for name, places in slots.items():
            for module, attribute in places:
                saved.append((module, attribute, module._parameters[attribute]))
                module._parameters[attribute] = values[name]
        yield
    finally:
        for module, attribute, original in reversed(saved):
            module._parameters[attribute] = original
