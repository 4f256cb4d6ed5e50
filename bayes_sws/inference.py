"""Fitting a :class:`~bayes_sws.model.SoftWeightSharingModel`: MAP by Pyro's SVI machinery.

MAP uses an ``AutoDelta`` guide and the ``Trace_ELBO`` objective (zero entropy, so
the loss is E(w) + λΩ(w) − log p(π, μ, 1/σ²); :func:`map_loss` computes it without
the guide's zero log-density), with a torch optimiser over the guide's
unconstrained parameters:

* ``"adam"``: minibatch steps (N/B-scaled likelihood), one learning rate per
  parameter group (weights, means, precisions, mixing proportions);
* ``"lbfgs"`` and ``"cg"`` (Polak–Ribière nonlinear conjugate gradients):
  full-batch, as the slides recommend;
* optionally an EM update of the mixtures, weights held fixed, between steps.
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyro
import scipy.optimize
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoDelta, init_to_value
from torch.distributions import transform_to
from tqdm.auto import tqdm

from .data import Dataset, batches
from .errors import FitError
from .model import SoftWeightSharingModel

__all__ = [
    "LearningRates",
    "MAPResult",
    "OPTIMIZERS",
    "ScipyMinimizer",
    "evaluate",
    "fit_map",
    "map_loss",
    "parameter_group",
]

OPTIMIZERS = ("adam", "lbfgs", "cg")


@dataclass(frozen=True)
class LearningRates:
    """Learning rate of each parameter group (Adam); ``weights`` also covers pass-through parameters.

    The defaults follow Ullrich et al.'s public code.
    """

    weights: float = 5e-4
    means: float = 1e-4
    precisions: float = 3e-3
    pi: float = 3e-3

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"learning rate for {name} must be positive, got {value}")


def parameter_group(site: str) -> str:
    """The learning-rate group of a site or parameter name.

    >>> parameter_group("mixture.layers.0.weight.precisions"), parameter_group("layers.0.weight")
    ('precisions', 'weights')
    """
    suffix = site.rsplit(".", 1)[-1]
    return {"means": "means", "precisions": "precisions", "pi": "pi", "pi_zero": "pi"}.get(
        suffix, "weights"
    )


@dataclass
class MAPResult:
    """The outcome of :func:`fit_map`.

    Attributes
    ----------
    values : dict
        Every sample site's MAP value (constrained), keyed by site name.
    parameters : dict
        Pass-through network parameters (``pyro.param`` sites), keyed by parameter name.
    history : list of dict
        One record per epoch: ``epoch``, ``loss`` (objective per training example),
        test metrics from :func:`evaluate`, and ``mixtures``.
    seconds : float
        Wall time of the fitting loop.
    optimizer_state : dict
        The torch optimiser's ``state_dict`` at the end.
    """

    values: dict[str, torch.Tensor]
    parameters: dict[str, torch.Tensor]
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    optimizer_state: dict = field(default_factory=dict)

    def all_values(self) -> dict[str, torch.Tensor]:
        """Site values and pass-through parameters in one dict (network names)."""
        return {**self.values, **self.parameters}


class ScipyMinimizer(torch.optim.Optimizer):
    """Full-batch minimisation by :func:`scipy.optimize.minimize`, used like ``torch.optim.LBFGS``.

    ``optimizer.step(closure)`` flattens every parameter into one float64 vector,
    runs up to ``max_iter`` iterations of ``method`` from there (each step starts
    afresh), writes the point it ends at back into the parameters and returns the
    loss at that point. The closure re-evaluates the loss and its gradient.

    A trial point whose loss or gradient is not finite (a step that overflowed a
    log-precision, say) is reported to scipy with a zero gradient and a loss above
    every finite one seen in the step, so the line search takes it for too long a
    step and interpolates back. Reporting ``inf`` instead breaks the interpolation:
    L-BFGS-B then stalls at the start, and torch's strong-Wolfe search (in
    ``torch.optim.LBFGS``) computes NaN step lengths.

    Parameters
    ----------
    params : iterable of Tensor
    method : {"CG", "L-BFGS-B"}
        Polak–Ribière nonlinear conjugate gradients, or limited-memory BFGS.
    max_iter : int
        Iterations per :meth:`step`.
    tolerance_grad : float
        Stop when the gradient's largest entry falls below this (L-BFGS-B also
        stops once the loss's relative decrease falls below scipy's ``ftol``).

    Examples
    --------
    >>> optimizer = ScipyMinimizer(model.parameters(), method="CG", max_iter=20)
    >>> loss = optimizer.step(closure)
    """

    def __init__(self, params, *, method: str, max_iter: int = 20, tolerance_grad: float = 1e-9) -> None:
        super().__init__(params, {"method": method, "max_iter": max_iter, "tolerance_grad": tolerance_grad})

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _write(self, point: np.ndarray) -> None:
        offset = 0
        for p in self._params():
            p.copy_(torch.from_numpy(point[offset: offset + p.numel()]).view_as(p))
            offset += p.numel()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        settings = self.param_groups[0]
        params = self._params()
        highest = -math.inf

        def loss_and_grad(point: np.ndarray) -> tuple[float, np.ndarray]:
            nonlocal highest
            self._write(point)
            with torch.enable_grad():
                loss = float(closure().detach())
            grad = torch.cat([
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params
            ]).to("cpu", torch.float64).numpy()
            if math.isfinite(loss) and np.isfinite(grad).all():
                highest = max(highest, loss)
                return loss, grad
            return (highest + abs(highest) + 1.0 if math.isfinite(highest) else math.inf), np.zeros_like(grad)

        start = torch.cat([p.reshape(-1) for p in params]).to("cpu", torch.float64).numpy()
        result = scipy.optimize.minimize(
            loss_and_grad, start, jac=True, method=settings["method"],
            options={"maxiter": settings["max_iter"], "gtol": settings["tolerance_grad"]},
        )
        self._write(result.x)
        return torch.tensor(result.fun, dtype=torch.float64)


def evaluate(
    model: SoftWeightSharingModel,
    values: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 2048,
) -> dict[str, float]:
    """Test metrics of the model at fixed site values (a MAP point or one posterior draw).

    Parameters
    ----------
    model : SoftWeightSharingModel
    values : dict
        Values of every sample site (pass-through parameters come from Pyro's param store).
    x : Tensor of shape ``(M, *input_shape)``
    y : Tensor of shape ``(M,)``

    Returns
    -------
    dict with ``nll`` (mean negative log-likelihood per example) and ``accuracy``
    (classification) or ``mse`` (regression).
    """
    conditioned = poutine.condition(model, data=values)
    nll, score = 0.0, 0.0
    training = model.network.training
    model.network.eval()
    try:
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                xb, yb = x[start: start + batch_size], y[start: start + batch_size]
                trace = poutine.trace(conditioned).get_trace(xb, yb)
                outputs = trace.nodes["_RETURN"]["value"]
                nll -= float(trace.nodes["y"]["fn"].log_prob(yb).sum())
                if model.likelihood.task == "classification":
                    score += float((outputs.argmax(-1) == yb).sum())
                else:
                    score += float(((outputs.reshape(-1) - yb) ** 2).sum())
    finally:
        model.network.train(training)
    key = "accuracy" if model.likelihood.task == "classification" else "mse"
    return {"nll": nll / x.shape[0], key: score / x.shape[0]}


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


def _make_optimizer(name: str, groups: dict[str, list[torch.Tensor]], learning_rates: LearningRates,
                    *, iterations: int) -> torch.optim.Optimizer:
    """Adam with a learning rate per group, or a full-batch scipy method doing ``iterations`` per step."""
    if name == "adam":
        # fused: one kernel per parameter for the whole update (CPU and CUDA)
        return torch.optim.Adam(
            [{"params": params, "lr": getattr(learning_rates, group)} for group, params in groups.items()],
            fused=True,
        )
    methods = {"lbfgs": "L-BFGS-B", "cg": "CG"}
    if name not in methods:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    params = [p for params in groups.values() for p in params]
    return ScipyMinimizer(params, method=methods[name], max_iter=iterations)


def _write_sites(guide: AutoDelta, values: dict[str, torch.Tensor]) -> None:
    """Overwrite the guide's point estimates in place (optimiser state stays attached)."""
    store = dict(pyro.get_param_store().named_parameters())
    with torch.no_grad():
        for site, value in values.items():
            support = guide.prototype_trace.nodes[site]["fn"].support
            store[f"{guide._pyro_name}.{site}"].copy_(transform_to(support).inv(value))


def _em_step(model: SoftWeightSharingModel, guide: AutoDelta) -> None:
    values = guide.median()
    updated = {}
    for group, mixture in model.mixtures(values).items():
        new = model.prior.em_update(model.group_weights(values, group), mixture,
                                    prior_weight=model.prior_weight)
        updated.update({f"{group}.{suffix}": v for suffix, v in model.prior.split(new).items()})
    _write_sites(guide, updated)


def _mixture_summary(mixtures: dict) -> str:
    mixture = next(iter(mixtures.values()))
    return f"π0={mixture.weights[0]:.3f} σ∈[{mixture.scales.min():.2g},{mixture.scales.max():.2g}]"


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
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
) -> MAPResult:
    """Find the MAP point of the model on a dataset.

    Parameters
    ----------
    model : SoftWeightSharingModel
    data : Dataset
        On the device the fit should run on.
    epochs : int
        Passes over the data (Adam) or outer iterations of ``iterations_per_epoch``
        full-batch steps (L-BFGS, CG).
    batch_size : int
        Minibatch size for Adam.
    optimizer : {"adam", "lbfgs", "cg"}
    learning_rates : LearningRates
        Adam's per-group rates; CG's first step length is ``learning_rates.weights``.
    iterations_per_epoch : int
        Full-batch iterations per epoch (L-BFGS, CG).
    em_every : int, optional
        Run an EM update of the mixtures every this many optimiser steps.
    init_values : dict, optional
        Starting values of some or all sites; the others start at
        ``model.initial_values()`` (the network's current weights and the configured
        initial mixture).
    seed : int
        Seeds Pyro and torch; a fit is reproducible on the same machine.
    progress : bool
        Show a progress bar with the loss, test metrics and mixture state.
    on_epoch : callable, optional
        Called with each epoch's history record.

    Returns
    -------
    MAPResult

    Raises
    ------
    FitError
        If the loss becomes non-finite.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be at least 1")
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    x, y, n = data.train_x, data.train_y, data.train_x.shape[0]
    guide = AutoDelta(model, init_loc_fn=init_to_value(values={**model.initial_values(), **(init_values or {})}))
    full_batch = optimizer != "adam"

    def loss_on(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return map_loss(model, guide, xb, yb, data_size=n)

    with pyro.validation_enabled(False):
        loss_on(x[:batch_size], y[:batch_size])  # creates the guide's parameters
        store = dict(pyro.get_param_store().named_parameters())
        groups: dict[str, list[torch.Tensor]] = {}
        for name, param in store.items():
            groups.setdefault(parameter_group(name), []).append(param)
        torch_optimizer = _make_optimizer(optimizer, groups, learning_rates, iterations=iterations_per_epoch)
        generator = torch.Generator(device=x.device).manual_seed(seed)
        steps_per_epoch = 1 if full_batch else math.ceil(n / batch_size)
        history: list[dict] = []
        bar = tqdm(total=epochs * steps_per_epoch, disable=not progress, unit="step", dynamic_ncols=True)
        started = time.perf_counter()
        step = 0
        for epoch in range(1, epochs + 1):
            total = 0.0
            for index in _epoch_batches(n, batch_size, full_batch, generator, x.device):
                xb, yb = x[index], y[index]

                def closure() -> torch.Tensor:
                    torch_optimizer.zero_grad(set_to_none=True)
                    loss = loss_on(xb, yb)
                    loss.backward()
                    return loss

                if full_batch:
                    torch_optimizer.step(closure)
                    with torch.no_grad():  # L-BFGS returns the loss before its iterations
                        loss = loss_on(xb, yb)
                else:
                    loss = closure()
                    torch_optimizer.step()
                value = loss.item()
                if not math.isfinite(value):
                    bar.close()
                    raise FitError(f"the loss became {value} at epoch {epoch}, step {step + 1}: "
                                   "lower the learning rates or the prior weight")
                total += value
                step += 1
                if em_every and step % em_every == 0:
                    _em_step(model, guide)
                bar.update(1)
            values = {k: v.detach() for k, v in guide.median().items()}
            record = {"epoch": epoch, "loss": total / steps_per_epoch / n,
                      **evaluate(model, values, data.test_x, data.test_y)}
            mixtures = model.mixtures(values)
            record["mixtures"] = {group: m.as_dict() for group, m in mixtures.items()}
            history.append(record)
            bar.set_postfix_str(
                f"loss={record['loss']:.4g} "
                + " ".join(f"{k}={record[k]:.4g}" for k in ("accuracy", "mse") if k in record)
                + " " + _mixture_summary(mixtures)
            )
            if on_epoch is not None:
                on_epoch(record)
        bar.close()
        seconds = time.perf_counter() - started
    passthrough = {name: pyro.param(f"network.{name}").detach() for name in model.passthrough}
    return MAPResult(values=values, parameters=passthrough, history=history, seconds=seconds,
                     optimizer_state=torch_optimizer.state_dict())


def _epoch_batches(n: int, batch_size: int, full_batch: bool, generator: torch.Generator,
                   device: torch.device) -> Iterator[torch.Tensor]:
    if full_batch:
        return iter([torch.arange(n, device=device)])
    return batches(n, batch_size=batch_size, generator=generator, device=device)
