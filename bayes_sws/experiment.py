"""Running a specification end to end, and the run's saved state.

:func:`run` is what ``bayes-sws fit`` does: load data, build the network and the
Pyro model, fit, and write ``metrics.json``, ``checkpoint.pt``, ``weights.png``
and ``history.png`` to the output directory. Every input is validated before
anything is trained or written, and files appear whole (written to a temporary
name, then renamed).

    >>> from bayes_sws import load_spec, run
    >>> metrics = run(load_spec("models/digits.toml"), out_dir="runs/digits")
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import plots
from .data import Dataset, load_dataset
from .errors import BayesSWSError
from .fitting import FitState, evaluate, library_scope
from .inference import PosteriorSamples, check_nuts, fit_map, fit_nuts, fit_vi, sample_guide, vi_guide
from .model import Categorical, Gaussian, SoftWeightSharingModel
from .nets import build_network
from .kernels import use_backend
from .prior import GaussianMixture, SoftWeightSharingPrior
from .spec import Spec, parse_spec

__all__ = ["CHECKPOINT_FORMAT", "FittedModel", "build_model", "load_checkpoint", "load_run_data", "resolve_device",
           "run"]

CHECKPOINT_FORMAT = 2


def resolve_device(name: str) -> torch.device:
    """``"cpu"`` or ``"cuda"`` (``"cuda:1"`` …), checked to exist."""
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BayesSWSError(f"device {name!r} requested but CUDA is not available here")
        return torch.device(name)
    raise BayesSWSError(f"unknown device {name!r}: use cpu or cuda")


def build_model(
    spec: Spec,
    *,
    input_shape: tuple[int, ...],
    task: str,
    n_outputs: int,
    device: torch.device | str = "cpu",
) -> SoftWeightSharingModel:
    """The Pyro model a specification describes, for data of the given shape.

    The network's initial weights are drawn from torch's RNG seeded with
    ``spec.seed`` (forked: the caller's RNG is left as it was).

    Parameters
    ----------
    spec : Spec
    input_shape : tuple of int
        One input's shape, e.g. ``(1, 28, 28)``.
    task : {"classification", "regression"}
    n_outputs : int
        Classes, or 1 for regression.
    device : torch.device or str
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        network = build_network(spec.network.architecture, hidden=spec.network.hidden,
                                activation=spec.network.activation, input_shape=input_shape,
                                n_outputs=n_outputs).to(device)
    return SoftWeightSharingModel(
        network,
        prior=SoftWeightSharingPrior.from_spec(spec.prior.mixture),
        likelihood=Categorical() if task == "classification" else Gaussian(
            noise_scale=spec.likelihood.noise_scale, noise_prior_scale=spec.likelihood.noise_prior_scale),
        prior_weight=spec.prior.weight,
        include_biases=spec.prior.include_biases,
        shared=spec.prior.shared,
    )


def _data_shape(data: Dataset) -> dict[str, Any]:
    return {"input_shape": list(data.input_shape), "task": data.task, "n_outputs": data.n_classes or 1}


@dataclass
class FittedModel:
    """A fitted model loaded back from a checkpoint.

    Attributes
    ----------
    spec : Spec
    model : SoftWeightSharingModel
        Its ``network`` holds the fitted weights.
    values : dict
        Every sample site's fitted value (MAP: the point; VI: the guide's median;
        NUTS: the mean of the draws).
    metrics : dict
        The run's metrics as saved.
    guide : AutoGuide, optional
        A variational fit's guide, restored from the checkpoint.
    posterior : PosteriorSamples, optional
        A NUTS fit's saved chains.
    """

    spec: Spec
    model: SoftWeightSharingModel
    values: dict[str, torch.Tensor]
    metrics: dict[str, Any]
    guide: torch.nn.Module | None = None
    posterior: PosteriorSamples | None = None

    def posterior_samples(self, num_draws: int = 100, *, seed: int = 0) -> PosteriorSamples:
        """The fit's posterior as draws in (chain, draw) layout.

        Parameters
        ----------
        num_draws : int
            Draws from a variational guide; ignored by MAP (one chain of one draw,
            the point) and NUTS (its saved chains, as sampled).
        seed : int
            Seeds the guide's draws (a forked RNG: the caller's is left as it was).

        Returns
        -------
        PosteriorSamples, ``samples[site]`` of shape ``(chains, draws, *site_shape)``.
        """
        if self.posterior is not None:
            return self.posterior
        if self.guide is not None:
            return sample_guide(self.model, self.guide, num_draws=num_draws, seed=seed)
        return PosteriorSamples(method="map", samples={name: value[None, None] for name, value in self.values.items()})

    @property
    def network(self) -> torch.nn.Module:
        return self.model.network

    @property
    def mixtures(self) -> dict[str, GaussianMixture]:
        return self.model.mixtures(self.values)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Network outputs at the fitted weights, ``(B, outputs)``."""
        with torch.no_grad():
            return self.network(x)


def _write_atomically(path: Path, write: Callable[[str], None]) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _metric_name(data: Dataset) -> str:
    return "accuracy" if data.task == "classification" else "arv"


_METRICS_AT = {"map": "map point", "vi": "guide median", "nuts": "posterior mean"}
"""Where ``metrics.json``'s split metrics are evaluated: one point, never the posterior predictive (``diagnose``)."""


def _split_metrics(model: SoftWeightSharingModel, values: dict, data: Dataset) -> dict[str, float]:
    """Metrics on the validation and test splits; regression reports the average relative variance (ARV)."""
    splits = {"test": (data.test_x, data.test_y), **{f"test_{k}": v for k, v in data.extra_tests.items()}}
    if data.valid_x is not None:
        splits["valid"] = (data.valid_x, data.valid_y)
    metrics = {}
    for split, (x, y) in splits.items():
        result = evaluate(model, values, x, y)
        metrics[f"{split}_nll"] = result["nll"]
        if data.task == "classification":
            metrics[f"{split}_accuracy"] = result["accuracy"]
        else:
            metrics[f"{split}_arv"] = result["mse"] / data.target_variance
    return metrics


def run(
    spec: Spec,
    *,
    out_dir: str | os.PathLike[str],
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Fit a specification and write its artefacts; return the metrics.

    Parameters
    ----------
    spec : Spec
    out_dir : path-like
        Created if needed. Receives ``metrics.json``, ``checkpoint.pt``,
        ``weights.png`` (histogram and mixture) and ``history.png``.
    device : str
        ``"cpu"`` or ``"cuda"``.
    progress : bool
        Show a progress bar.

    Returns
    -------
    dict, the content of ``metrics.json``.
    """
    torch_device = resolve_device(device)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BayesSWSError(f"output path {out} exists and is not a directory")
    with use_backend(spec.inference.kernels):  # the kernel choice holds for this run only
        return _fit_and_save(spec, out, torch_device, progress=progress)


def load_run_data(spec: Spec) -> tuple[Dataset, dict[str, torch.Tensor]]:
    """The data a specification fits on, and the inputs it holds out.

    Returns
    -------
    (Dataset, dict of str to Tensor)
        The dataset with its validation split, without ``data.held_out_class``; and
        ``{"class_<k>": that class's test inputs}`` (empty when no class is held out).
    """
    data = load_dataset(spec.data.dataset, path=spec.data.path, seed=spec.seed)
    held_out = {}
    if spec.data.held_out_class is not None:
        data, images = data.hold_out_class(spec.data.held_out_class)
        held_out[f"class_{spec.data.held_out_class}"] = images
    return data.with_validation(spec.data.validation_fraction, seed=spec.seed), held_out


def _fit_and_save(spec: Spec, out: Path, torch_device: torch.device, *, progress: bool) -> dict[str, Any]:
    data = load_run_data(spec)[0].to(torch_device)
    model = build_model(spec, **_data_shape(data), device=torch_device)
    settings = spec.inference
    if settings.method == "nuts":  # before the MAP fit, which may take long
        check_nuts(model, data)
    common = dict(batch_size=settings.batch_size, optimizer=settings.optimizer,
                  learning_rates=settings.learning_rates,
                  iterations_per_epoch=settings.iterations_per_epoch, seed=spec.seed, progress=progress)
    pretrain_seconds = 0.0
    if settings.pretrain_epochs:
        likelihood_only = SoftWeightSharingModel(
            model.network, prior=model.prior, likelihood=model.likelihood, prior_weight=0.0,
            include_biases=spec.prior.include_biases, shared=spec.prior.shared)
        pretrain_seconds = fit_map(likelihood_only, data, epochs=settings.pretrain_epochs, **common).seconds
    result = fit_map(model, data, epochs=settings.epochs, em_every=settings.em_every or None, **common)
    map_history = result.history
    result, posterior, bayes_seconds = _bayesian_stage(spec, model, data, result, progress=progress)
    values = result.values if posterior is None else _posterior_mean(posterior)
    model.load_values(values)

    metric = _metric_name(data)
    for record in result.history:
        if metric == "arv":
            for key in [k for k in record if k.endswith("_mse")]:
                record[key.removesuffix("_mse") + "_arv"] = record[key] / data.target_variance
    mixtures = model.mixtures(values)
    metrics = {
        "model": spec.name,
        "method": spec.inference.method,
        "optimizer": spec.inference.optimizer,
        "device": str(torch_device),
        "seed": spec.seed,
        "epochs": spec.inference.epochs,
        "pretrain_epochs": spec.inference.pretrain_epochs,
        "seconds": result.seconds + pretrain_seconds + bayes_seconds,
        "train_loss": result.history[-1]["loss"],
        "metrics_at": _METRICS_AT[spec.inference.method],
        **_split_metrics(model, values, data),
        "n_weights": model.n_weights,
        "prior_weight": model.prior_weight,
        "mixture": {group: m.as_dict() for group, m in mixtures.items()}
        if not model.shared else next(iter(mixtures.values())).as_dict(),
        "history": result.history,
        **({"map_history": map_history} if result.history is not map_history else {}),
        **({"nuts": _nuts_summary(posterior, bayes_seconds)} if posterior is not None else {}),
        "spec": spec.to_dict(),
    }
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BayesSWSError(f"cannot create output directory {out}: {error.strerror}") from None
    _write_atomically(out / "metrics.json", lambda p: Path(p).write_text(json.dumps(metrics, indent=2)))
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "spec": spec.to_dict(),
        "data": _data_shape(data),
        "values": {k: v.cpu() for k, v in values.items()},
        "network": {k: v.detach().cpu() for k, v in model.network.state_dict().items()},
        "fit_state": result.state_dict(),
        "metrics": metrics,
        **({"posterior": {"samples": _cpu(posterior.samples), "sample_stats": _cpu(posterior.sample_stats)}}
           if posterior is not None else {}),
    }
    _write_atomically(out / "checkpoint.pt", lambda p: torch.save(checkpoint, p))
    group = next(iter(model.groups))
    _write_atomically(out / "weights.png", lambda p: plots.plot_weights(
        model.group_weights(values, group), mixtures[group], p,
        title=f"{spec.name}: weights and learned mixture"))
    _write_atomically(out / "history.png", lambda p: plots.plot_history(
        result.history, p, metric=f"test_{metric}", group=group))
    return metrics


def _bayesian_stage(spec: Spec, model: SoftWeightSharingModel, data: Dataset, map_state: FitState, *,
                    progress: bool) -> tuple[FitState, PosteriorSamples | None, float]:
    """``method = "vi"`` / ``"nuts"``: continue from the MAP fit. Returns the state, NUTS draws, NUTS seconds."""
    settings = spec.inference
    if settings.method == "vi":
        vi = settings.vi
        state = fit_vi(model, data, epochs=vi.epochs, batch_size=settings.batch_size,
                       learning_rates=vi.learning_rates, num_particles=vi.num_particles,
                       init_values=map_state.values, init_scale=vi.init_scale, mixture_guide=vi.mixture_guide,
                       local_reparameterization=vi.local_reparameterization, seed=spec.seed, progress=progress)
        return state, None, 0.0
    if settings.method == "nuts":
        nuts = settings.nuts
        started = time.perf_counter()
        posterior = fit_nuts(model, data, num_chains=nuts.num_chains, warmup_steps=nuts.warmup,
                             num_samples=nuts.draws, init_values=map_state.values,
                             max_tree_depth=nuts.max_tree_depth, target_accept_prob=nuts.target_accept_prob,
                             seed=spec.seed, progress=progress)
        return map_state, posterior, time.perf_counter() - started
    return map_state, None, 0.0


def _posterior_mean(posterior: PosteriorSamples) -> dict[str, torch.Tensor]:
    return {name: value.mean(dim=(0, 1)) for name, value in posterior.samples.items()}


def _nuts_summary(posterior: PosteriorSamples, seconds: float) -> dict[str, Any]:
    stats = posterior.sample_stats
    return {"chains": posterior.n_chains, "draws": posterior.n_draws, "seconds": seconds,
            "divergences": int(stats["diverging"].sum()),
            "mean_acceptance_rate": float(stats["acceptance_rate"].mean())}


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.detach().cpu() for name, value in tensors.items()}


def _restored_guide(spec: Spec, model: SoftWeightSharingModel, shape: dict[str, Any],
                    state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A VI run's guide, built as the fit built it and loaded with its saved parameters."""
    parameter = next(model.network.parameters())
    x = parameter.new_zeros((1, *shape["input_shape"]))
    y = (torch.zeros(1, dtype=torch.long, device=x.device) if shape["task"] == "classification"
         else parameter.new_zeros(1))
    with library_scope():
        guide = vi_guide(model, init_scale=spec.inference.vi.init_scale, mixture_guide=spec.inference.vi.mixture_guide)
        guide(x, y, data_size=1)  # creates its parameters
        guide.load_state_dict(state)
    return guide


def _one_line(error: Exception) -> str:
    """An exception's message on one line (torch's state-dict errors run to several)."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def load_checkpoint(path: str | os.PathLike[str], *, device: str = "cpu") -> FittedModel:
    """Load a run's ``checkpoint.pt`` back into a :class:`FittedModel`.

    The file is read with ``torch.load(..., weights_only=True)``: it holds tensors
    and plain data only, and loading it runs no code from it. The network is rebuilt
    from the saved specification (no data is loaded: only its shape is needed, and
    it is saved too) and gets the fitted values; nothing global changes, so any
    number of checkpoints can be loaded side by side.

    Raises
    ------
    BayesSWSError
        If the file is missing, unreadable, or not a checkpoint of this format.
    """
    path = Path(path)
    torch_device = resolve_device(device)
    try:
        checkpoint = torch.load(path, map_location=torch_device, weights_only=True)
    except FileNotFoundError:
        raise BayesSWSError(f"checkpoint {path} not found") from None
    except pickle.UnpicklingError:
        raise BayesSWSError(f"checkpoint {path} holds more than tensors and plain data (a format-1 "
                            "bayes-sws checkpoint, or not a bayes-sws file): refused, since loading it "
                            "could run code") from None
    except Exception as error:  # torch raises many types for a damaged or foreign file
        first_line = (str(error).splitlines() or [type(error).__name__])[0]
        raise BayesSWSError(f"checkpoint {path} cannot be read: {first_line}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise BayesSWSError(f"checkpoint {path} is not a bayes-sws checkpoint of format {CHECKPOINT_FORMAT}")
    try:
        spec = parse_spec(checkpoint["spec"])
        values, shape = checkpoint["values"], checkpoint["data"]
    except (BayesSWSError, KeyError) as error:  # e.g. written by another bayes-sws version
        raise BayesSWSError(f"checkpoint {path} does not match this bayes-sws: {_one_line(error)}") from None
    model = build_model(spec, input_shape=tuple(shape["input_shape"]), task=shape["task"],
                        n_outputs=shape["n_outputs"], device=torch_device)
    try:
        model.network.load_state_dict(checkpoint["network"])
        model.load_values(values)
    except (RuntimeError, KeyError) as error:
        raise BayesSWSError(f"checkpoint {path} does not match its specification: {_one_line(error)}") from None
    guide, posterior = None, None
    try:
        if spec.inference.method == "vi":
            guide = _restored_guide(spec, model, shape, checkpoint["fit_state"]["guide"])
        if spec.inference.method == "nuts":
            posterior = PosteriorSamples(method="nuts", samples=checkpoint["posterior"]["samples"],
                                         sample_stats=checkpoint["posterior"]["sample_stats"])
    except (RuntimeError, KeyError) as error:
        raise BayesSWSError(f"checkpoint {path} lacks its {spec.inference.method} posterior: "
                            f"{_one_line(error)}") from None
    return FittedModel(spec=spec, model=model, values=values, metrics=checkpoint["metrics"], guide=guide,
                       posterior=posterior)
