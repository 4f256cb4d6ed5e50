"""One fit loop for every method: a model, a guide, a loss, an optimiser and callbacks.

MAP (``AutoDelta`` with :func:`~bayes_sws.inference.map_loss`), variational
inference (a Normal guide with ``Trace_ELBO``) and distributed training are
configurations of the same loop. It works on objects, never on Pyro's global state:

* the guide's parameters live on the guide (the loop runs under Pyro's
  ``module_local_params``), the network's pass-through parameters on the network;
* randomness comes from the fit's own generators: the user's torch RNG is the same
  before and after a fit;
* everything needed to continue is in :class:`FitState`, whose
  :meth:`~FitState.state_dict` holds tensors and plain data only, so
  ``torch.load(..., weights_only=True)`` reads it back.

    >>> state = start_fit(model, guide, data, loss=map_loss, seed=0)
    >>> fit(state, data, epochs=10, callbacks=[Evaluate("test", data.test_x, data.test_y)])
    >>> saved = state.state_dict()          # ... later, in a new process:
    >>> state = start_fit(model, guide, data, loss=map_loss, seed=0)
    >>> state.load_state_dict(saved)
    >>> fit(state, data, epochs=20)          # continues at epoch 11
"""

from __future__ import annotations

import contextlib
import itertools
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoContinuous, AutoGuideList
from tqdm.auto import tqdm

from . import kernels
from .data import Dataset, batches
from .distributed import current_reduction
from .errors import FitError, one_line
from .model import SoftWeightSharingModel
from .optim import OPTIMIZERS, LearningRates, make_optimizer

__all__ = [
    "Callback",
    "Evaluate",
    "FitState",
    "GradientReduction",
    "Loss",
    "STATE_FORMAT",
    "evaluate",
    "fit",
    "library_scope",
    "parameter_group",
    "parameter_groups",
    "start_fit",
]

STATE_FORMAT = 1
"""Version of :meth:`FitState.state_dict`'s layout."""

Loss = Callable[..., torch.Tensor]
"""``loss(model, guide, x, y, data_size=N) -> Tensor``, e.g. ``map_loss`` or ``Trace_ELBO().differentiable_loss``."""

_COLLAPSED_SCALE = 1e-4
"""A mixture component this narrow (σ) is named as the likely cause of a non-finite loss."""

_GROUP_OF_SUFFIX = {"means": "means", "precisions": "precisions", "pi": "pi", "pi_zero": "pi"}
_GUIDE_NAMES = itertools.count()


@contextlib.contextmanager
def library_scope() -> Iterator[None]:
    """Run Pyro code the way the library does: guide parameters module-local, validation off.

    Inside, a ``PyroModule`` guide keeps its parameters on itself and never reads or
    writes Pyro's global param store, so any number of models and guides coexist.
    """
    with pyro.settings.context(module_local_params=True), pyro.validation_enabled(False):
        yield


def parameter_group(name: str) -> str:
    """The learning-rate group of a site or parameter name.

    >>> parameter_group("mixture.layers.0.weight.precisions"), parameter_group("layers.0.weight")
    ('precisions', 'weights')
    >>> parameter_group("locs.mixture.pi_unconstrained")
    'pi'
    """
    suffix = name.removesuffix("_unconstrained").rsplit(".", 1)[-1]
    return _GROUP_OF_SUFFIX.get(suffix, "weights")


def parameter_groups(model: SoftWeightSharingModel, guide: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """The trainable parameters of a guide and a model's pass-through parameters, by learning-rate group.

    Returns
    -------
    dict
        Group name (``weights``, ``means``, ``precisions``, ``pi``, and ``mixture`` for a joint
        guide over the mixture sites) → parameters, in
        a deterministic order (a saved optimiser state loads back into the same slots).
    """
    groups: dict[str, list[torch.nn.Parameter]] = {}
    network = dict(model.network.named_parameters())
    joint = _joint_mixture_parameters(model, guide)
    named = [*guide.named_parameters(), *((name, network[name]) for name in model.passthrough)]
    for name, parameter in named:
        if parameter.requires_grad:
            group = "mixture" if id(parameter) in joint else parameter_group(name)
            groups.setdefault(group, []).append(parameter)
    return groups


def _joint_mixture_parameters(model: SoftWeightSharingModel, guide: torch.nn.Module) -> set[int]:
    """Ids of the parameters of a guide list's joint parts over mixture sites only (one ``loc`` for π, μ, 1/σ²).

    Their names say no site, so :func:`parameter_group` cannot place them; they take
    :attr:`LearningRates.mixture`.
    """
    if not isinstance(guide, AutoGuideList):
        return set()
    return {id(parameter) for part in guide if isinstance(part, AutoContinuous)
            and part._unconstrained_shapes.keys().isdisjoint(model.prior_sites)
            for parameter in part.parameters()}


def _random_states(device: torch.device) -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_random_states(states: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


@contextlib.contextmanager
def _own_randomness(device: torch.device, states: dict[str, torch.Tensor] | None = None) -> Iterator[None]:
    """Torch's RNG forked for the duration (set to ``states`` if given); the caller's RNG is restored."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if states is not None:
            _set_random_states(states, device)
        yield


@dataclass
class FitState:
    """Everything a fit has and needs to continue: objects, counters, history.

    Attributes
    ----------
    model : SoftWeightSharingModel
    guide : torch.nn.Module
        A Pyro guide (an autoguide or another ``PyroModule``); its parameters live on it.
    loss : Loss
    optimizer : torch.optim.Optimizer
        Over :func:`parameter_groups` of the model and guide.
    optimizer_name : str
        ``"adam"``, ``"lbfgs"`` or ``"cg"``; the last two take full-batch steps.
    batch_size : int
    generator : torch.Generator
        Shuffles the batches.
    random_states : dict
        Torch's RNG state(s) inside the fit, carried from one call of :func:`fit` to the next.
    epoch, step : int
        Completed epochs and optimiser steps.
    history : list of dict
        One record per completed epoch (see :func:`fit`).
    seconds : float
        Wall time spent in :func:`fit`.
    epoch_progress : dict or None
        Where an interrupted epoch stopped (see :func:`fit`): the batch generator's
        state at the epoch's start, the steps done, their summed loss and seconds;
        ``None`` between epochs.
    reduction : GradientReduction or None
        Set by :func:`start_fit` when torch.distributed is initialised with several
        processes (:func:`bayes_sws.distributed.current_reduction`); ``None`` otherwise.
    """

    model: SoftWeightSharingModel
    guide: torch.nn.Module
    loss: Loss
    optimizer: torch.optim.Optimizer
    optimizer_name: str
    batch_size: int
    generator: torch.Generator
    random_states: dict[str, torch.Tensor]
    epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    epoch_progress: dict[str, Any] | None = None
    reduction: GradientReduction | None = None

    @property
    def full_batch(self) -> bool:
        return self.optimizer_name != "adam"

    @property
    def values(self) -> dict[str, torch.Tensor]:
        """The guide's point estimate (its median) of every latent site: copies, not views of parameters."""
        with library_scope(), torch.no_grad():
            return {name: value.detach().clone() for name, value in self.guide.median().items()}

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain data only: ``torch.save`` it, ``torch.load(..., weights_only=True)`` it back."""
        return {
            "format": STATE_FORMAT,
            "guide": _cpu(self.guide.state_dict()),
            "network": _cpu(self.model.network.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "optimizer_name": self.optimizer_name,
            "generator": self.generator.get_state(),
            "random_states": {k: v.cpu() for k, v in self.random_states.items()},
            "epoch": self.epoch,
            "step": self.step,
            "history": self.history,
            "seconds": self.seconds,
            "epoch_progress": self.epoch_progress,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output, taken from a state built the same way.

        Raises
        ------
        FitError
            If the state is of another format or optimiser, or does not fit this
            state's model, guide or optimiser (its state is then partly loaded).
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise FitError(f"fit state of format {found!r}; this version reads {STATE_FORMAT}")
        if state.get("optimizer_name") != self.optimizer_name:
            raise FitError(f"fit state was made with optimizer {state.get('optimizer_name')!r}, "
                           f"not {self.optimizer_name!r}")
        try:
            self.guide.load_state_dict(state["guide"])
            self.model.network.load_state_dict(state["network"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.generator.set_state(state["generator"])
            self.random_states = dict(state["random_states"])
            self.epoch, self.step = int(state["epoch"]), int(state["step"])
            self.history = list(state["history"])
            self.seconds = float(state["seconds"])
            self.epoch_progress = _checked_progress(state.get("epoch_progress"))
        except (KeyError, RuntimeError, ValueError, TypeError) as error:
            raise FitError(f"fit state does not match this model and settings: {one_line(error)}") from None


def _checked_progress(progress: Any) -> dict[str, Any] | None:
    if progress is None:
        return None
    if not (isinstance(progress, dict) and isinstance(progress.get("generator"), torch.Tensor)
            and type(progress.get("steps")) is int and progress["steps"] >= 0
            and isinstance(progress.get("total"), float) and isinstance(progress.get("seconds"), float)):
        raise TypeError("its record of an interrupted epoch is damaged")
    return dict(progress)


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu() for name, tensor in tensors.items()}


def _prepare_guide(guide: torch.nn.Module) -> None:
    """Ready a fresh ``PyroModule`` guide to keep its parameters on itself.

    Pyro decides where a ``PyroModule`` keeps its parameters when it is built: one
    built outside :func:`library_scope` gets the module-local store it lacks. It
    also gets a name of its own, since autoguides are all named after their class
    and two of them used outside the library's scope would share entries of Pyro's
    global param store.
    """
    if not isinstance(guide, pyro.nn.PyroModule) or getattr(guide, "prototype_trace", None) is not None:
        return
    guide._pyro_name = f"{guide._pyro_name}.{next(_GUIDE_NAMES)}"
    if not hasattr(guide._pyro_context, "param_state"):
        guide._pyro_context.param_state = {"params": {}, "constraints": {}}


def start_fit(
    model: SoftWeightSharingModel,
    guide: torch.nn.Module,
    data: Dataset,
    *,
    loss: Loss,
    optimizer: str = "adam",
    learning_rates: LearningRates = LearningRates(),
    batch_size: int = 128,
    iterations_per_epoch: int = 20,
    seed: int = 0,
) -> FitState:
    """Set up a fit: create the guide's parameters and the optimiser over them, seed the fit.

    Parameters
    ----------
    model : SoftWeightSharingModel
    guide : torch.nn.Module
        A Pyro guide for ``model``, e.g. ``AutoDelta(model, init_loc_fn=...)``.
    data : Dataset
        On the device the fit runs on.
    loss : Loss
    optimizer : {"adam", "lbfgs", "cg"}
        Adam takes minibatch steps with a learning rate per group; L-BFGS and CG
        take ``iterations_per_epoch`` full-batch iterations per epoch.
    learning_rates : LearningRates
    batch_size : int
        Adam's minibatch size.
    iterations_per_epoch : int
    seed : int
        Seeds the fit's own random streams (the shuffle and torch's RNG inside
        the fit); the caller's RNG is left as it was.

    Returns
    -------
    FitState at epoch 0.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if batch_size < 1 or iterations_per_epoch < 1:
        raise ValueError("batch_size and iterations_per_epoch must be at least 1")
    device = data.train_x.device
    dtypes = {p.dtype for p in model.network.parameters()}
    if dtypes != {data.train_x.dtype}:
        raise FitError(f"the data's inputs are {data.train_x.dtype} but the network's parameters are "
                       f"{', '.join(map(str, sorted(dtypes, key=str)))}: convert one to the other")
    _prepare_guide(guide)
    with _own_randomness(device), library_scope():
        torch.manual_seed(seed)
        n = data.train_x.shape[0]
        xb, yb = data.train_x[:batch_size], data.train_y[:batch_size]
        guide(xb, yb, data_size=n)  # creates its parameters
        with torch.no_grad():
            # A loss's first call may settle its own configuration (Trace_ELBO guesses
            # max_plate_nesting from draws): here, so that a resumed fit draws the same.
            loss(model, guide, xb, yb, data_size=n)
        random_states = _random_states(device)
    torch_optimizer = make_optimizer(optimizer, parameter_groups(model, guide), learning_rates,
                                     iterations=iterations_per_epoch)
    return FitState(
        model=model, guide=guide, loss=loss, optimizer=torch_optimizer, optimizer_name=optimizer,
        batch_size=batch_size, generator=torch.Generator(device=device).manual_seed(seed),
        random_states=random_states, reduction=current_reduction(),
    )


class Callback:
    """Hooks into :func:`fit`; override either.

    Callbacks run in the order given, outside the fit's random stream (what they
    draw does not change the fit), after the state has counted the step or epoch.
    """

    def on_step(self, state: FitState) -> None:
        """After each optimiser step."""

    def on_epoch(self, state: FitState, record: dict) -> None:
        """After each epoch; add entries to ``record`` (it is ``state.history[-1]``)."""

    def on_interrupt(self, state: FitState) -> None:
        """When SIGINT or SIGTERM stopped the fit between two steps; ``state`` can continue (e.g. save it)."""


class GradientReduction(Protocol):
    """How several processes share one step (:mod:`bayes_sws.distributed`); ``None`` in one process.

    Every process draws the same global batch; :meth:`shard` picks this process's
    part of it, and :meth:`reduce`, called between ``backward`` and the optimiser's
    step, turns the local gradients and loss into those of the global batch.
    """

    is_main: bool
    """Whether this process evaluates, reports and writes."""

    def shard(self, index: torch.Tensor) -> torch.Tensor:
        """This process's part of a global batch of indices ``(B,)``."""

    def reduce(self, loss: torch.Tensor | None, parameters: list[torch.nn.Parameter], *,
               weight: float) -> torch.Tensor:
        """Combine gradients (in place) and losses of all processes; return the global loss (0-dim)."""


def evaluate(
    model: SoftWeightSharingModel,
    values: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 2048,
) -> dict[str, float]:
    """Metrics of the model at fixed site values (a MAP point or one posterior draw).

    Parameters
    ----------
    model : SoftWeightSharingModel
        Its network provides the pass-through parameters.
    values : dict
        Values of the latent sites.
    x : Tensor of shape ``(M, *input_shape)``
    y : Tensor of shape ``(M,)``

    Returns
    -------
    dict with ``nll`` (mean negative log-likelihood per example) and the
    likelihood's own scores (:meth:`~bayes_sws.model.Likelihood.scores`: ``accuracy``
    for classification, ``mse`` for regression), each a mean over the M examples.
    """
    conditioned = poutine.condition(model, data=values)
    totals: dict[str, float] = {}
    training = model.network.training
    model.network.eval()
    try:
        with torch.no_grad(), library_scope():
            for start in range(0, x.shape[0], batch_size):
                xb, yb = x[start: start + batch_size], y[start: start + batch_size]
                trace = poutine.trace(conditioned).get_trace(xb, yb)
                sums = {"nll": -trace.nodes["y"]["fn"].log_prob(yb).sum(),
                        **model.likelihood.scores(trace.nodes["_RETURN"]["value"], yb)}
                for key, value in sums.items():
                    totals[key] = totals.get(key, 0.0) + float(value)
    finally:
        model.network.train(training)
    return {key: value / x.shape[0] for key, value in totals.items()}


@dataclass
class Evaluate(Callback):
    """Adds ``{name}_nll`` and ``{name}_<score>`` at the guide's point to each epoch's record.

    >>> Evaluate("test", data.test_x, data.test_y)
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor

    def on_epoch(self, state: FitState, record: dict) -> None:
        if not _is_main(state):
            return
        scores = evaluate(state.model, state.values, self.x, self.y)
        record.update({f"{self.name}_{key}": value for key, value in scores.items()})


def _epoch_batches(state: FitState, n: int, device: torch.device) -> Iterator[torch.Tensor]:
    """The epoch's batches; an interrupted epoch's again from its start, the ones it took skipped."""
    if state.epoch_progress is None:
        state.epoch_progress = {"generator": state.generator.get_state(), "steps": 0, "total": 0.0, "seconds": 0.0}
    else:
        state.generator.set_state(state.epoch_progress["generator"])
    if state.full_batch:
        epoch = iter([torch.arange(n, device=device)])
    else:
        epoch = batches(n, batch_size=state.batch_size, generator=state.generator, device=device)
    return itertools.islice(epoch, state.epoch_progress["steps"], None)


class _Signals:
    """SIGINT and SIGTERM, held until the fit is between two steps (a second one stops at once)."""

    def __init__(self) -> None:
        self.received: str | None = None

    @contextlib.contextmanager
    def deferred(self) -> Iterator[_Signals]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def hold(signum: int, frame: object) -> None:
            if self.received is not None:
                raise KeyboardInterrupt(signal.Signals(signum).name)
            self.received = signal.Signals(signum).name

        previous = {number: signal.signal(number, hold) for number in (signal.SIGINT, signal.SIGTERM)
                    if signal.getsignal(number) is not signal.SIG_IGN}  # e.g. `nohup`, `cmd &` in a script
        try:
            yield self
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


def _is_main(state: FitState) -> bool:
    return state.reduction is None or state.reduction.is_main


def _likely_cause(state: FitState) -> str:
    """A hint for a non-finite loss or gradient: a collapsing mixture component, else the step sizes."""
    mixtures = state.model.mixtures(state.values)
    group, scale = min(((g, float(m.scales.min())) for g, m in mixtures.items()), key=lambda item: item[1])
    if not scale > _COLLAPSED_SCALE:
        return (f"mixture {group!r} has a collapsed component (σ = {scale:.3g}): give the precisions "
                "a hyperprior (prior.hyperpriors.precision_gamma) or lower learning_rates.precisions")
    if state.full_batch:
        return "lower the prior weight or start from a pretrained network"
    names = parameter_groups(state.model, state.guide)
    rates = ", ".join(f"{name}={group['lr']:.3g}" for name, group in zip(names, state.optimizer.param_groups))
    return f"lower the learning rates ({rates}) or the prior weight"


def _checked_loss(state: FitState, loss: torch.Tensor, parameters: list[torch.nn.Parameter]) -> float:
    """The step's loss as a float, after checking it and the gradients are finite.

    The gradients are checked in one fused pass over all of them (:func:`~bayes_sws.kernels.any_nonfinite`);
    a sum or largest magnitude per tensor took 0.1-1 ms a step on LeNet-300-100.
    """
    gradients = [p.grad for p in parameters if p.grad is not None]
    found = kernels.any_nonfinite(gradients)
    value = float(loss.detach())
    gradient = 0.0
    if found:
        gradient = next(float(g[~torch.isfinite(g)][0]) for g in gradients if not bool(torch.isfinite(g).all()))
    if not (math.isfinite(value) and math.isfinite(gradient)):
        what = f"the loss became {value}" if not math.isfinite(value) else f"a gradient became {gradient}"
        raise FitError(f"{what} at epoch {state.epoch + 1}, step {state.step + 1}: {_likely_cause(state)}")
    return value


def _take_step(state: FitState, index: torch.Tensor, x: torch.Tensor, y: torch.Tensor, n: int) -> float:
    parameters = [p for group in state.optimizer.param_groups for p in group["params"]]
    local = index if state.reduction is None else state.reduction.shard(index)
    value = math.nan

    def closure() -> torch.Tensor:
        nonlocal value
        for parameter in parameters:  # the optimiser's zero_grad(set_to_none=True), without its profiling hooks
            parameter.grad = None
        # index_select: a third of the time x[local]'s advanced indexing takes for a batch of rows
        batch = (x.index_select(0, local), y.index_select(0, local))
        loss = state.loss(state.model, state.guide, *batch, data_size=n) if len(local) else None
        if loss is not None:
            loss.backward()
        if state.reduction is not None:
            loss = state.reduction.reduce(loss, parameters, weight=len(local) / len(index))
        value = _checked_loss(state, loss, parameters)
        return loss

    if state.full_batch:
        return float(state.optimizer.step(closure))  # the loss at the point it leaves
    closure()
    state.optimizer.step()
    return value


def _describe(record: dict) -> str:
    scores = " ".join(f"{k}={v:.4g}" for k, v in record.items()
                      if isinstance(v, float) and k != "loss" and not k.endswith("nll"))
    return f"loss={record['loss']:.4g} {scores}"


def fit(
    state: FitState,
    data: Dataset,
    *,
    epochs: int,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
) -> FitState:
    """Train until ``state.epoch == epochs``; a resumed state continues where it stopped.

    Each epoch is one pass over the training data in shuffled minibatches (Adam) or
    one full-batch optimiser call (L-BFGS, CG). The epoch's record holds ``epoch``,
    ``loss`` (the objective per training example, averaged over the epoch's steps)
    and ``mixtures`` (each group's ``{"pi", "mu", "sigma"}`` at the guide's point),
    plus what the callbacks add.

    Parameters
    ----------
    state : FitState
        From :func:`start_fit`, possibly loaded with a saved state.
    data : Dataset
    epochs : int
        The total number of epochs the fit should have when this returns.
    callbacks : sequence of Callback
    progress : bool
        Show a progress bar.

    Returns
    -------
    FitState, the same object, updated.

    Raises
    ------
    FitError
        If the loss becomes non-finite. The state then holds the failed epoch's partial
        progress; continue from a saved :meth:`FitState.state_dict` instead.
    KeyboardInterrupt
        On SIGINT or SIGTERM (in the main thread), once the step under way has finished:
        the state then records its place inside the epoch (``epoch_progress``), each
        callback's :meth:`Callback.on_interrupt` gets it, and a fit continued from it
        ends exactly where an uninterrupted one does. A second signal stops at once.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    x, y, n = data.train_x, data.train_y, data.train_x.shape[0]
    device = x.device
    steps_per_epoch = 1 if state.full_batch else math.ceil(n / state.batch_size)
    step_callbacks = [c for c in callbacks if type(c).on_step is not Callback.on_step]
    signals = _Signals()
    done = state.epoch_progress["steps"] if state.epoch_progress is not None and state.epoch < epochs else 0
    bar = tqdm(total=max(0, epochs - state.epoch) * steps_per_epoch, initial=done,
               disable=not progress or not _is_main(state), unit="step", dynamic_ncols=True)
    try:
        with signals.deferred():
            for epoch in range(state.epoch + 1, epochs + 1):
                started = time.perf_counter()
                with _own_randomness(device, state.random_states), library_scope():
                    for index in _epoch_batches(state, n, device):
                        value = _take_step(state, index, x, y, n)
                        if not math.isfinite(value):  # the full-batch optimisers' final point
                            raise FitError(f"the loss became {value} at epoch {epoch}, step {state.step + 1}: "
                                           f"{_likely_cause(state)}")
                        state.epoch_progress["total"] += value
                        state.epoch_progress["steps"] += 1
                        state.step += 1
                        for callback in step_callbacks:
                            with _own_randomness(device):
                                callback.on_step(state)
                        bar.update(1)
                        if signals.received:
                            state.random_states = _random_states(device)
                            break
                    else:
                        state.random_states = _random_states(device)
                elapsed = time.perf_counter() - started
                if signals.received and state.epoch_progress["steps"] < steps_per_epoch:
                    state.epoch_progress["seconds"] += elapsed
                    _stop(state, callbacks, signals.received, device)
                total = state.epoch_progress["total"]
                state.seconds += state.epoch_progress["seconds"] + elapsed
                state.epoch_progress = None
                state.epoch = epoch
                mixtures = state.model.mixtures(state.values)
                record = {"epoch": epoch, "loss": total / steps_per_epoch / n,
                          "mixtures": {group: mixture.as_dict() for group, mixture in mixtures.items()}}
                state.history.append(record)
                for callback in callbacks:
                    with _own_randomness(device):
                        callback.on_epoch(state, record)
                bar.set_postfix_str(_describe(record))
                if signals.received:
                    _stop(state, callbacks, signals.received, device)
        if signals.received:  # arrived after the last epoch's check, before the handlers were restored
            _stop(state, callbacks, signals.received, device)
    finally:
        bar.close()
    return state


def _stop(state: FitState, callbacks: Sequence[Callback], signal_name: str, device: torch.device) -> None:
    """Hand the stopped state to the callbacks (a checkpoint saves it), then stop as Ctrl-C does."""
    for callback in callbacks:
        with _own_randomness(device):
            callback.on_interrupt(state)
    raise KeyboardInterrupt(signal_name)
