"""ArviZ for every fit: draws → ``InferenceData``, summaries, PSIS-LOO, plots, NetCDF.

The only module that imports arviz (and, for ArviZ's figures, pyplot: each one is
closed once written, and the matplotlib backend is never set here). Any fit gives
:class:`~bayes_sws.inference.PosteriorSamples` — MAP one chain of one draw, VI one
chain of guide draws, NUTS its chains with ``sample_stats`` — and
:func:`to_inference_data` turns it into groups

    posterior             pi, mu, sigma  (chain, draw[, group], component)  from model.mixtures
                          each weight site, dims named after its layer:
                          "layers.0.weight" → ("layers_0_out", "layers_0_in")
                          other latent sites (e.g. noise_scale)
    sample_stats          the sampler's statistics (NUTS)
    posterior_predictive  y  (chain, draw, obs)   one replicate per draw
    log_likelihood        y  (chain, draw, obs)   for PSIS-LOO
    observed_data         y  (obs,)

Large networks keep a leading block of each weight tensor (``weights_per_dim``
indices along every dimension, coordinates the true indices).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Sequence

import arviz as az
import numpy as np
import torch
from matplotlib.figure import Figure

from .errors import BayesSWSError
from .inference import PosteriorSamples
from .model import SoftWeightSharingModel
from .predictive import ClassificationPredictive, RegressionPredictive

__all__ = [
    "LOO_MIN_DRAWS",
    "MIXTURE_VARIABLES",
    "load_inference_data",
    "loo",
    "plot_mixture_forest",
    "plot_trace",
    "plot_weight_posteriors",
    "save_inference_data",
    "summary",
    "to_inference_data",
    "weight_dims",
]

MIXTURE_VARIABLES = ("pi", "mu", "sigma")
"""Posterior variables of the mixture: proportions, means and standard deviations per component."""

LOO_MIN_DRAWS = 21
"""Fewest draws for PSIS-LOO: ArviZ fits each Pareto tail to the largest ⌈S/5⌉ weights, and needs 5."""

_DIM_SUFFIXES = {2: ("out", "in"), 3: ("out", "in", "k"), 4: ("out", "in", "kh", "kw"),
                 5: ("out", "in", "kd", "kh", "kw")}


def weight_dims(site: str, ndim: int) -> tuple[str, ...]:
    """Named dimensions of a weight site: ``"layers.0.weight"``, 2 → ``("layers_0_out", "layers_0_in")``.

    A bias (``ndim`` 1) shares its layer's ``_out`` dimension; parameters of other
    shapes get ``<site>_dim<i>``.
    """
    layer, _, kind = site.rpartition(".")
    base = (layer or site).replace(".", "_")
    if base[0].isdigit():  # an nn.Sequential's layer "1" → "layer_1"
        base = f"layer_{base}"
    if kind == "weight" and ndim in _DIM_SUFFIXES:
        return tuple(f"{base}_{suffix}" for suffix in _DIM_SUFFIXES[ndim])
    if kind == "bias" and ndim == 1:
        return (f"{base}_out",)
    return tuple(f"{site.replace('.', '_')}_dim{i}" for i in range(ndim))


def to_inference_data(
    model: SoftWeightSharingModel,
    posterior: PosteriorSamples,
    *,
    predictive: ClassificationPredictive | RegressionPredictive | None = None,
    observed: torch.Tensor | None = None,
    max_weights: int = 5000,
    weights_per_dim: int = 4,
) -> az.InferenceData:
    """Turn a fit's draws (and optionally its predictive on data) into ``InferenceData``.

    Parameters
    ----------
    model : SoftWeightSharingModel
    posterior : PosteriorSamples
        Site draws ``(chains, draws, *site_shape)``.
    predictive : ClassificationPredictive or RegressionPredictive, optional
        From :func:`~bayes_sws.predictive.predict` on ``posterior.flat()`` with targets and a
        seed: gives ``log_likelihood`` and ``posterior_predictive`` (its ``(S, B)`` fields,
        S = chains × draws, reshaped to ``(chains, draws, B)``).
    observed : Tensor ``(B,)``, optional
        The targets the predictive was computed on: ``observed_data``.
    max_weights : int
        Networks with at most this many prior weights keep them all in ``posterior``.
    weights_per_dim : int
        Otherwise, the leading ``weights_per_dim`` indices along each dimension of each weight site.

    Returns
    -------
    arviz.InferenceData
    """
    chains, draws = posterior.n_chains, posterior.n_draws
    mixtures = model.mixtures(posterior.samples)
    groups = list(mixtures)
    variables: dict[str, np.ndarray] = {}
    dims: dict[str, list[str]] = {}
    for name, field in (("pi", "proportions"), ("mu", "means"), ("sigma", "scales")):
        stacked = torch.stack([getattr(mixtures[group], field) for group in groups], dim=-2)
        stacked = stacked.expand(chains, draws, *stacked.shape[-2:])
        if len(groups) == 1:
            variables[name], dims[name] = _numpy(stacked[..., 0, :]), ["component"]
        else:
            variables[name], dims[name] = _numpy(stacked), ["group", "component"]
    n_components = variables["pi"].shape[-1]
    coords: dict[str, list] = {"component": list(range(n_components))}
    if len(groups) > 1:
        coords["group"] = groups
    subset = model.n_weights > max_weights
    for site in model.prior_sites:
        value = posterior.samples[site]
        names = weight_dims(site, value.dim() - 2)
        if subset:
            value = value[(slice(None), slice(None), *(slice(0, weights_per_dim) for _ in names))]
        variables[site], dims[site] = _numpy(value), list(names)
        for dim, size in zip(names, value.shape[2:]):
            coords[dim] = list(range(size))
    mixture_sites = tuple(f"{group}." for group in groups)
    for site, value in posterior.samples.items():
        if site not in variables and not site.startswith(mixture_sites):
            variables[site] = _numpy(value)

    groups_data: dict = {"posterior": variables}
    if posterior.sample_stats:
        groups_data["sample_stats"] = {k: _numpy(v) for k, v in posterior.sample_stats.items()}
    if predictive is not None:
        if predictive.log_likelihood is not None:
            groups_data["log_likelihood"] = {"y": _numpy(predictive.log_likelihood.reshape(chains, draws, -1))}
            dims["y"] = ["obs"]
        if predictive.replicates is not None:
            groups_data["posterior_predictive"] = {"y": _numpy(predictive.replicates.reshape(chains, draws, -1))}
            dims["y"] = ["obs"]
    if observed is not None:
        groups_data["observed_data"] = {"y": _numpy(observed)}
        dims["y"] = ["obs"]
    return az.from_dict(**groups_data, coords=coords, dims=dims,
                        attrs={"inference_method": posterior.method})


def summary(idata: az.InferenceData, *, var_names: Sequence[str] | None = None):
    """``az.summary`` of the posterior: means, sds, HDIs, ESS (bulk, tail) and R-hat per scalar.

    Parameters
    ----------
    idata : InferenceData
    var_names : sequence of str, optional
        Defaults to the mixture variables and any non-weight latent site.

    Returns
    -------
    pandas.DataFrame, one row per scalar.
    """
    names = list(var_names) if var_names is not None else _default_variables(idata)
    with _quiet():
        return az.summary(idata, var_names=names)


def loo(idata: az.InferenceData):
    """PSIS-LOO from the ``log_likelihood`` group (``az.loo``): ``elpd_loo``, ``p_loo``, Pareto k.

    Raises
    ------
    BayesSWSError
        Without a log-likelihood, with a single draw (a MAP fit: nothing to smooth), or
        with fewer than :data:`LOO_MIN_DRAWS` draws (ArviZ then fits no tail: every k is inf).
    """
    if "log_likelihood" not in idata.groups():
        raise BayesSWSError("PSIS-LOO needs a log_likelihood group: build the InferenceData with a predictive")
    n_samples = idata.posterior.sizes["chain"] * idata.posterior.sizes["draw"]
    if n_samples < 2:
        raise BayesSWSError("PSIS-LOO needs posterior draws; this fit has one (a MAP point)")
    if n_samples < LOO_MIN_DRAWS:
        raise BayesSWSError(f"PSIS-LOO needs at least {LOO_MIN_DRAWS} draws to fit its Pareto tails, got {n_samples}")
    with warnings.catch_warnings():  # the result's ``warning`` flag and Pareto k values say it
        warnings.simplefilter("ignore", UserWarning)
        return az.loo(idata, pointwise=True)


def plot_trace(idata: az.InferenceData, path: str | os.PathLike[str] | None = None, *,
               var_names: Sequence[str] | None = None) -> Figure:
    """Trace plots, or rank plots (bars per chain) where there are several chains.

    ``var_names`` defaults to the mixture variables and any non-weight latent site.
    """
    kind = "rank_bars" if idata.posterior.sizes["chain"] > 1 else "trace"
    names = list(var_names) if var_names is not None else _default_variables(idata)
    with _quiet():
        return _finish(az.plot_trace(idata, var_names=names, kind=kind, compact=True), path)


def plot_mixture_forest(idata: az.InferenceData, path: str | os.PathLike[str] | None = None) -> Figure:
    """Forest plot of π, μ and σ per component (94 % HDIs, chains combined)."""
    with _quiet():
        return _finish(az.plot_forest(idata, var_names=list(MIXTURE_VARIABLES), combined=True), path)


def plot_weight_posteriors(idata: az.InferenceData, path: str | os.PathLike[str] | None = None, *,
                           site: str | None = None, n_weights: int = 6) -> Figure:
    """Marginal posteriors of a few weights of one site (the first prior site by default).

    Parameters
    ----------
    idata : InferenceData
    path : path-like, optional
    site : str, optional
        A weight variable of ``idata.posterior``.
    n_weights : int
        The first ``n_weights`` entries of its leading block along its first two dimensions.
    """
    names = [name for name in idata.posterior.data_vars if name not in MIXTURE_VARIABLES
             and idata.posterior[name].ndim > 2]
    if site is None:
        if not names:
            raise BayesSWSError("the posterior holds no weight variables")
        site = names[0]
    if site not in idata.posterior:
        raise BayesSWSError(f"the posterior has no variable {site!r}")
    variable = idata.posterior[site]
    leading = variable.dims[2:]
    flat = variable.stack(weight=leading).isel(weight=slice(0, n_weights))
    selection = {dim: sorted(set(flat[dim].values.tolist())) for dim in leading}
    with _quiet():
        return _finish(az.plot_posterior(idata, var_names=[site], coords=selection), path)


def save_inference_data(idata: az.InferenceData, path: str | os.PathLike[str]) -> None:
    """Write ``idata`` to a NetCDF (HDF5) file."""
    idata.to_netcdf(str(path))


def load_inference_data(path: str | os.PathLike[str]) -> az.InferenceData:
    """Read a NetCDF file written by :func:`save_inference_data` fully into memory (the file is closed after)."""
    if not os.path.isfile(path):
        raise BayesSWSError(f"InferenceData file {path} not found")
    with az.rc_context({"data.load": "eager"}):
        return az.from_netcdf(str(path))


def _default_variables(idata: az.InferenceData) -> list[str]:
    return [name for name in idata.posterior.data_vars
            if name in MIXTURE_VARIABLES or idata.posterior[name].ndim == 2]  # mixture, scalar sites


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence ArviZ's warnings about one chain or one draw (a MAP point): R-hat and densities are NaN or flat there."""
    logger = getattr(az, "_log", logging.getLogger("arviz"))  # arviz 0.23's own logger, outside logging's registry
    level = logger.level
    logger.setLevel(logging.ERROR)  # "Shape validation failed" for fewer than 4 draws
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)  # matplotlib's, about ArviZ's calls
            yield
    finally:
        logger.setLevel(level)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().double().numpy() if tensor.is_floating_point() else tensor.detach().cpu().numpy()


def _finish(axes, path: str | os.PathLike[str] | None) -> Figure:
    """The figure ArviZ drew on: written to ``path`` if given, and closed in pyplot either way."""
    import matplotlib.pyplot as plt

    figure = np.asarray(axes).ravel()[0].get_figure()
    plt.close(figure)
    if path is not None:
        figure.savefig(path, dpi=100)
    return figure
