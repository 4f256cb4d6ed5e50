"""Running a specification end to end, and the run's saved state.

:func:`run` is what ``bayes-sws fit`` does: load data, build the network and the
Pyro model, fit, and write ``metrics.json``, ``checkpoint.pt``, ``weights.png``
and ``history.png`` to the output directory. Every input is validated before
anything is trained or written; the fit is checkpointed every epoch and can be
resumed; the results appear together, by one rename (:mod:`bayes_sws.storage`).

A run is three phases: :func:`_fit` (a spec, model and data → :class:`FitResult`),
:func:`_metrics`, and :func:`_write_artefacts` (into a directory that
:func:`~bayes_sws.storage.publish` then moves into place).

    >>> from bayes_sws import load_spec, run
    >>> metrics = run(load_spec("models/digits.toml"), out_dir="runs/digits")
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import plots
from .data import Dataset, load_dataset, physical_memory_bytes
from .distributed import is_main_process
from .errors import BayesSWSError, FitError, interrupts_as_keyboard, one_line
from .fitting import Callback, FitState, evaluate, library_scope
from .inference import PosteriorSamples, check_nuts, fit_map, fit_nuts, fit_vi, sample_guide, vi_guide
from .model import Categorical, Gaussian, SoftWeightSharingModel
from .nets import build_network
from .kernels import use_backend
from .prior import GaussianMixture, SoftWeightSharingPrior
from .spec import Spec, parse_spec
from .storage import Checkpoint, lock_directory, partial_dir, publish, save_tensors, write_atomically

__all__ = ["ARTEFACTS", "CHECKPOINT_FORMAT", "DIAGNOSTICS", "FitResult", "FittedModel", "RUN_STATE_FORMAT", "build_model",
           "load_checkpoint", "load_run_data", "resolve_device", "run"]

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
    _check_size(spec, input_shape=input_shape, n_outputs=n_outputs, device=torch.device(device))
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


_BYTES_PER_PARAMETER = 4 * 8
"""float32 × (weights, guide point, gradient, two Adam moments, values, evaluation copies: about 8)."""
_PRIOR_TEMPORARIES = 4 * 4
"""float32 × 4 temporaries per weight of a chunk (at most 2**16 weights) and mixture component: the prior term."""


def _check_size(spec: Spec, *, input_shape: tuple[int, ...], n_outputs: int, device: torch.device) -> None:
    """Refuse, before allocating, a model whose training would need more memory than the device has.

    The network is built on the ``meta`` device (shapes only) to count its
    parameters; the estimate is rough (see ``_BYTES_PER_PARAMETER`` and
    ``_PRIOR_TEMPORARIES``) and errs high only by small factors.
    """
    try:
        with torch.device("meta"):
            network = build_network(spec.network.architecture, hidden=spec.network.hidden,
                                    activation=spec.network.activation, input_shape=input_shape,
                                    n_outputs=n_outputs)
    except (ValueError, RuntimeError) as error:
        raise BayesSWSError(f"network {spec.network.architecture} cannot take inputs of shape "
                            f"{input_shape}: {one_line(error)}") from None
    n_parameters = sum(p.numel() for p in network.parameters())
    chunk = min(n_parameters, 1 << 16)
    needed = (n_parameters * _BYTES_PER_PARAMETER
              + chunk * spec.prior.mixture.n_components * _PRIOR_TEMPORARIES)
    available = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
                 else physical_memory_bytes())
    if needed > available:
        raise BayesSWSError(
            f"training this model needs about {needed / 2**30:.1f} GiB ({n_parameters:,} network parameters, "
            f"{spec.prior.mixture.n_components:,} mixture components, {n_outputs:,} outputs) but the "
            f"{device.type} device has {available / 2**30:.1f} GiB: make the network or the mixture smaller")


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


RUN_STATE_FORMAT = 1
"""Version of the staging checkpoint ``OUT.partial/state.pt`` (see :func:`run`)."""

_FIT_STATE_KEYS = {"format": int, "guide": dict, "network": dict, "optimizer": dict, "optimizer_name": str,
                   "generator": torch.Tensor, "random_states": dict, "epoch": int, "step": int,
                   "history": list, "seconds": float}


@dataclass
class FitResult:
    """What a fit hands to the writing phase.

    Attributes
    ----------
    state : FitState
        The (main) fit's final state.
    values : dict
        Every sample site's fitted value.
    seconds : float
        Wall time of the whole fit, pretraining included.
    map_history : list of dict, optional
        The MAP stage's history when a VI stage followed it (``state`` is then VI's).
    posterior : PosteriorSamples, optional
        NUTS's draws (``values`` is then their mean, ``state`` the MAP fit's).
    nuts_seconds : float
        Wall time of the NUTS stage.
    """

    state: FitState
    values: dict[str, torch.Tensor]
    seconds: float
    map_history: list[dict[str, Any]] | None = None
    posterior: PosteriorSamples | None = None
    nuts_seconds: float = 0.0


def run(
    spec: Spec,
    *,
    out_dir: str | os.PathLike[str],
    device: str = "cpu",
    progress: bool = True,
    resume: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Fit a specification and write its artefacts; return the metrics.

    While it runs, the fit's whole state is saved after every epoch to
    ``OUT.partial/state.pt`` beside the output directory ``OUT`` (pretraining
    included); an interrupted or failed run keeps it, and ``resume=True`` continues
    from it to exactly the result of an uninterrupted run. The results are written
    into a temporary directory and published as ``OUT`` by a rename
    (:func:`bayes_sws.storage.publish`); then ``OUT.partial`` is removed. SIGTERM
    stops a run as Ctrl-C does. Under ``torchrun`` (:mod:`bayes_sws.distributed`)
    every process trains its share of each batch, and only rank 0 evaluates,
    checkpoints and writes; to resume, every process reads ``OUT.partial/state.pt``
    (on several machines: a shared file system).

    Parameters
    ----------
    spec : Spec
    out_dir : path-like
        Receives ``metrics.json``, ``checkpoint.pt``, ``weights.png`` (histogram and
        mixture) and ``history.png``. Its parent is created if needed.
    device : str
        ``"cpu"`` or ``"cuda"``.
    progress : bool
        Show a progress bar.
    resume : bool
        Continue the unfinished run in ``OUT.partial`` (same specification).
    force : bool
        Replace an existing run in ``OUT``, or discard an unfinished one in ``OUT.partial``.

    Returns
    -------
    dict, the content of ``metrics.json`` (empty on processes other than rank 0).

    Raises
    ------
    BayesSWSError
        Before anything is fitted, if ``OUT`` holds a run (without ``force``), an
        unfinished run is in the way (without ``resume`` or ``force``), there is none
        to resume, or the output place is not writable.
    """
    torch_device = resolve_device(device)
    out = _output_path(out_dir)
    main = is_main_process()
    checkpoint = partial_dir(out) / "state.pt"
    lock = _prepare_output(out, resume=resume, force=force) if main else None
    try:
        saved = _load_run_state(checkpoint, spec) if resume else None  # every process continues from it
        return _fit_and_publish(spec, out, torch_device, checkpoint=checkpoint if main else None, saved=saved,
                    progress=progress and main, force=force)
    finally:
        if main:
            with contextlib.suppress(OSError):  # a staging directory that never got a state goes
                checkpoint.parent.rmdir()
        if lock is not None:
            os.close(lock)


def _fit_and_publish(spec: Spec, out: Path, torch_device: torch.device, *, checkpoint: Path | None,
         saved: dict[str, Any] | None, progress: bool, force: bool) -> dict[str, Any]:
    with use_backend(spec.inference.kernels), interrupts_as_keyboard():  # the kernel choice holds for this run only
        data = load_run_data(spec)[0].to(torch_device)
        model = build_model(spec, **_data_shape(data), device=torch_device)
        try:
            result = _fit(spec, model, data, checkpoint=checkpoint, saved=saved, progress=progress)
        except FitError as error:
            kept = checkpoint is not None and checkpoint.is_file()
            raise FitError(f"{error}; the last good epoch's state is kept in {checkpoint}" if kept
                           else str(error)) from None
        if checkpoint is None:  # another process than rank 0: evaluation and artefacts are rank 0's
            return {}
        metrics = _metrics(spec, model, data, result, torch_device)
        publish(out, lambda directory: _write_artefacts(directory, spec, model, data, result, metrics),
                force=force)
        shutil.rmtree(checkpoint.parent, ignore_errors=True)
    return metrics


def _output_path(out_dir: str | os.PathLike[str]) -> Path:
    """``out_dir`` made absolute, ``..`` and symbolic links resolved (``OUT.partial`` goes beside the real place)."""
    out = Path(os.path.realpath(out_dir))
    if not out.name:
        raise BayesSWSError(f"output directory {out_dir} is the file system's root: name a directory below it")
    return out


def _prepare_output(out: Path, *, resume: bool, force: bool) -> int | None:
    """Check the output place before fitting, create the staging directory ``OUT.partial`` and lock it.

    Returns
    -------
    int or None, the descriptor holding the lock (see :func:`~bayes_sws.storage.lock_directory`).
    """
    staging = partial_dir(out)
    if out.exists() and not out.is_dir():
        raise BayesSWSError(f"output path {out} exists and is not a directory")
    if _holds_files(out):
        strangers = sorted(entry.name for entry in out.iterdir() if entry.name not in (*ARTEFACTS, *DIAGNOSTICS))
        if strangers:
            raise BayesSWSError(f"{out} holds files that are not a bayes-sws run ({', '.join(strangers[:3])}): "
                                "name another output directory (--force replaces only a run)")
        if not force:
            raise BayesSWSError(f"{out} already holds a run: pass --force to replace it")
    if resume and not (staging / "state.pt").is_file():
        raise BayesSWSError(f"nothing to resume: {staging / 'state.pt'} does not exist")
    try:
        staging.mkdir(parents=True, exist_ok=True)
        probe = tempfile.TemporaryFile(dir=staging)
        probe.close()
    except OSError as error:
        raise BayesSWSError(f"cannot write in {staging.parent}: {error.strerror or error}") from None
    lock = lock_directory(staging)
    try:
        if (staging / "state.pt").is_file() and not (resume or force):
            raise BayesSWSError(f"{staging} holds an unfinished run: pass --resume to continue it "
                                "or --force to start again")
        if not resume:  # what a run that died left: a discarded state, temporaries
            for entry in staging.iterdir():
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
    except BaseException:
        if lock is not None:
            os.close(lock)
        raise
    return lock


def _holds_files(directory: Path) -> bool:
    return directory.is_dir() and any(directory.iterdir())


def _load_run_state(path: Path, spec: Spec) -> dict[str, Any]:
    """Read and check the staging checkpoint of an unfinished run of ``spec``."""
    content = _read_tensors(path)
    if content.get("format") != RUN_STATE_FORMAT:
        raise BayesSWSError(f"{path} is not a bayes-sws run state of format {RUN_STATE_FORMAT}")
    if content.get("spec") != spec.to_dict():
        raise BayesSWSError(f"{path} is the state of a run of another specification: resume with the "
                            "same specification and settings, or pass --force to start again")
    if content.get("phase") not in _PHASES or not isinstance(content.get("pretrain_seconds"), float):
        raise BayesSWSError(f"{path} is damaged: no valid phase")
    if content["phase"] == "vi" and not (isinstance(content.get("map_seconds"), float)
                                         and isinstance(content.get("map_history"), list)):
        raise BayesSWSError(f"{path} is damaged: its VI phase lacks the MAP stage's record")
    _check_fit_state(content.get("fit_state"), path)
    return content


def _check_fit_state(state: Any, path: Path) -> None:
    if not isinstance(state, dict):
        raise BayesSWSError(f"{path} holds no fit state")
    for key, kind in _FIT_STATE_KEYS.items():
        if not isinstance(state.get(key), kind):
            raise BayesSWSError(f"{path}: fit state entry {key!r} is missing or not a {kind.__name__}")


def _read_tensors(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` a dict, with every failure one line."""
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BayesSWSError(f"checkpoint {path} not found") from None
    except pickle.UnpicklingError:
        raise BayesSWSError(f"checkpoint {path} holds more than tensors and plain data (a format-1 "
                            "bayes-sws checkpoint, or not a bayes-sws file): refused, since loading it "
                            "could run code") from None
    except Exception as error:  # torch raises many types for a damaged or foreign file
        raise BayesSWSError(f"checkpoint {path} cannot be read: {one_line(error)}") from None
    if not isinstance(content, dict):
        raise BayesSWSError(f"checkpoint {path} is not a bayes-sws checkpoint")
    return content


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


_PHASES = ("pretrain", "train", "vi")  # the checkpointed phases of a run, in order


def _fit(spec: Spec, model: SoftWeightSharingModel, data: Dataset, *, checkpoint: Path | None,
         saved: dict[str, Any] | None, progress: bool) -> FitResult:
    """Pretrain (likelihood only), fit MAP, then VI or NUTS from the MAP point.

    Every epoch of the pretraining, MAP and VI phases is checkpointed to ``checkpoint``;
    a run continues from ``saved`` (its phase, the seconds and MAP history of the phases
    before it, and that phase's fit state). NUTS is not checkpointed: an interrupted
    NUTS stage starts again from the finished MAP fit.
    """
    settings = spec.inference
    if settings.method == "nuts":  # before the MAP fit, which may take long
        check_nuts(model, data)
    common = dict(batch_size=settings.batch_size, optimizer=settings.optimizer,
                  learning_rates=settings.learning_rates,
                  iterations_per_epoch=settings.iterations_per_epoch, seed=spec.seed, progress=progress)

    def saving(phase: str, pretrain_seconds: float = 0.0, **earlier: Any) -> list[Callback]:
        extra = {"format": RUN_STATE_FORMAT, "spec": spec.to_dict(), "phase": phase,
                 "pretrain_seconds": pretrain_seconds, **earlier}
        return [Checkpoint(checkpoint, extra)] if checkpoint is not None else []

    def saved_state(phase: str) -> dict[str, Any] | None:
        return saved["fit_state"] if saved is not None and saved["phase"] == phase else None

    pretrain_seconds = saved["pretrain_seconds"] if saved is not None else 0.0
    if settings.pretrain_epochs and (saved is None or saved["phase"] == "pretrain"):
        likelihood_only = SoftWeightSharingModel(
            model.network, prior=model.prior, likelihood=model.likelihood, prior_weight=0.0,
            include_biases=spec.prior.include_biases, shared=spec.prior.shared)
        pretrain_seconds = fit_map(likelihood_only, data, epochs=settings.pretrain_epochs,
                                   callbacks=saving("pretrain"), state_dict=saved_state("pretrain"),
                                   **common).seconds
    if settings.method == "vi" and saved is not None and saved["phase"] == "vi":
        map_seconds, map_history = saved["map_seconds"], saved["map_history"]
    else:
        state = fit_map(model, data, epochs=settings.epochs, em_every=settings.em_every or None,
                        callbacks=saving("train", pretrain_seconds), state_dict=saved_state("train"), **common)
        map_seconds, map_history = state.seconds, state.history
        if settings.method == "map":
            return FitResult(state=state, values=state.values, seconds=map_seconds + pretrain_seconds)
    if settings.method == "vi":
        vi = settings.vi
        state = fit_vi(model, data, epochs=vi.epochs, batch_size=settings.batch_size,
                       learning_rates=vi.learning_rates, num_particles=vi.num_particles,
                       init_values=None if saved_state("vi") else state.values, init_scale=vi.init_scale,
                       mixture_guide=vi.mixture_guide, local_reparameterization=vi.local_reparameterization,
                       callbacks=saving("vi", pretrain_seconds, map_seconds=map_seconds, map_history=map_history),
                       state_dict=saved_state("vi"), seed=spec.seed, progress=progress)
        values = state.values
        model.load_values(values)
        return FitResult(state=state, values=values, seconds=pretrain_seconds + map_seconds + state.seconds,
                         map_history=map_history)
    nuts = settings.nuts
    started = time.perf_counter()
    posterior = fit_nuts(model, data, num_chains=nuts.num_chains, warmup_steps=nuts.warmup,
                         num_samples=nuts.draws, init_values=state.values,
                         max_tree_depth=nuts.max_tree_depth, target_accept_prob=nuts.target_accept_prob,
                         seed=spec.seed, progress=progress)
    nuts_seconds = time.perf_counter() - started
    values = {name: value.mean(dim=(0, 1)) for name, value in posterior.samples.items()}
    model.load_values(values)
    return FitResult(state=state, values=values, seconds=pretrain_seconds + map_seconds + nuts_seconds,
                     posterior=posterior, nuts_seconds=nuts_seconds)


def _metrics(spec: Spec, model: SoftWeightSharingModel, data: Dataset, result: FitResult,
             torch_device: torch.device) -> dict[str, Any]:
    """The content of ``metrics.json``; regression histories get ARV entries beside the MSE ones."""
    metric = _metric_name(data)
    history = result.state.history
    for record in history:
        if metric == "arv":
            for key in [k for k in record if k.endswith("_mse")]:
                record[key.removesuffix("_mse") + "_arv"] = record[key] / data.target_variance
    mixtures = model.mixtures(result.values)
    return {
        "model": spec.name,
        "method": spec.inference.method,
        "optimizer": spec.inference.optimizer,
        "device": str(torch_device),
        "seed": spec.seed,
        "epochs": spec.inference.epochs,
        "pretrain_epochs": spec.inference.pretrain_epochs,
        "seconds": result.seconds,
        "train_loss": history[-1]["loss"],
        **_split_metrics(model, result.values, data),
        "metrics_at": _METRICS_AT[spec.inference.method],
        "n_weights": model.n_weights,
        "prior_weight": model.prior_weight,
        "mixture": {group: m.as_dict() for group, m in mixtures.items()}
        if not model.shared else next(iter(mixtures.values())).as_dict(),
        "history": history,
        **({"map_history": result.map_history} if result.map_history is not None else {}),
        **({"nuts": _nuts_summary(result.posterior, result.nuts_seconds)} if result.posterior is not None else {}),
        "spec": spec.to_dict(),
    }


ARTEFACTS = ("metrics.json", "checkpoint.pt", "weights.png", "history.png")
"""The files of a run directory (:func:`run`)."""
DIAGNOSTICS = ("idata.nc", "summary.csv", "diagnostics.json", "reliability.png", "uncertainty.png", "trace.png",
               "forest.png", "weight_posteriors.png")
"""The files ``bayes-sws diagnose`` adds to a run directory. Only a directory holding nothing
but these and :data:`ARTEFACTS` is replaced (``force``)."""


def _write_artefacts(directory: Path, spec: Spec, model: SoftWeightSharingModel, data: Dataset,
                     result: FitResult, metrics: dict[str, Any]) -> None:
    """Write ``metrics.json``, ``checkpoint.pt``, ``weights.png`` and ``history.png`` into ``directory``."""
    values = result.values
    write_atomically(directory / "metrics.json", lambda p: Path(p).write_text(json.dumps(metrics, indent=2)))
    save_tensors(directory / "checkpoint.pt", {
        "format": CHECKPOINT_FORMAT,
        "spec": spec.to_dict(),
        "data": _data_shape(data),
        "values": {k: v.cpu() for k, v in values.items()},
        "network": {k: v.detach().cpu() for k, v in model.network.state_dict().items()},
        "fit_state": result.state.state_dict(),
        "metrics": metrics,
        **({"posterior": {"samples": _cpu(result.posterior.samples),
                          "sample_stats": _cpu(result.posterior.sample_stats)}}
           if result.posterior is not None else {}),
    })
    group = next(iter(model.groups))
    mixtures = model.mixtures(values)
    write_atomically(directory / "weights.png", lambda p: plots.plot_weights(
        model.group_weights(values, group), mixtures[group], p,
        title=f"{spec.name}: weights and learned mixture"))
    write_atomically(directory / "history.png", lambda p: plots.plot_history(
        result.state.history, p, metric=f"test_{_metric_name(data)}", group=group))


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
    checkpoint = _read_tensors(path)
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise BayesSWSError(f"checkpoint {path} is not a bayes-sws checkpoint of format {CHECKPOINT_FORMAT}")
    for key, kind in _CHECKPOINT_KEYS.items():
        if not isinstance(checkpoint.get(key), kind):
            raise BayesSWSError(f"checkpoint {path}: entry {key!r} is missing or not a {kind.__name__}")
    try:
        spec = parse_spec(checkpoint["spec"])
    except BayesSWSError as error:  # e.g. written by another bayes-sws version
        raise BayesSWSError(f"checkpoint {path} does not match this bayes-sws: {error}") from None
    shape = _checked_data_shape(checkpoint["data"], path)
    model = build_model(spec, **shape, device=torch_device)
    values = {name: value.to(torch_device) for name, value in checkpoint["values"].items()
              if isinstance(value, torch.Tensor)}
    expected = {name: tuple(value.shape) for name, value in model.initial_values().items()}
    found = {name: tuple(value.shape) for name, value in values.items()}
    if found != expected:
        wrong = sorted(set(expected) ^ set(found) | {k for k in expected if found.get(k, expected[k]) != expected[k]})
        raise BayesSWSError(f"checkpoint {path} does not match its specification: sites {', '.join(wrong[:3])} "
                            "are missing, extra or of another shape")
    network = checkpoint["network"]
    if not all(isinstance(value, torch.Tensor) for value in network.values()):
        raise BayesSWSError(f"checkpoint {path}: the network state holds non-tensors")
    try:
        model.network.load_state_dict(network)
        model.load_values(values)
    except (RuntimeError, KeyError, ValueError) as error:
        raise BayesSWSError(f"checkpoint {path} does not match its specification: {one_line(error)}") from None
    guide, posterior = None, None
    try:
        if spec.inference.method == "vi":
            guide = _restored_guide(spec, model, shape, checkpoint["fit_state"]["guide"])
        if spec.inference.method == "nuts":
            posterior = PosteriorSamples(method="nuts", samples=checkpoint["posterior"]["samples"],
                                         sample_stats=checkpoint["posterior"]["sample_stats"])
    except (RuntimeError, KeyError, TypeError) as error:
        raise BayesSWSError(f"checkpoint {path} lacks its {spec.inference.method} posterior: "
                            f"{one_line(error)}") from None
    return FittedModel(spec=spec, model=model, values=values, metrics=checkpoint["metrics"], guide=guide,
                       posterior=posterior)


_CHECKPOINT_KEYS = {"spec": dict, "data": dict, "values": dict, "network": dict, "metrics": dict}


def _checked_data_shape(shape: dict[str, Any], path: Path) -> dict[str, Any]:
    """A checkpoint's ``data`` entry as :func:`build_model`'s keywords, checked."""
    input_shape, task, n_outputs = shape.get("input_shape"), shape.get("task"), shape.get("n_outputs")
    if not (isinstance(input_shape, list) and 1 <= len(input_shape) <= 3
            and all(type(d) is int and 1 <= d <= 2**16 for d in input_shape)
            and task in ("classification", "regression")
            and type(n_outputs) is int and 1 <= n_outputs <= 2**20):
        raise BayesSWSError(f"checkpoint {path}: its data shape entry is invalid")
    return {"input_shape": tuple(input_shape), "task": task, "n_outputs": n_outputs}
