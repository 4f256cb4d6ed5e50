"""Figures: the weight histogram under the learned mixture, the training history,
and the predictive's reliability diagram and entropy histograms.

The functions build :class:`matplotlib.figure.Figure` objects directly, without
pyplot: importing this module changes no global matplotlib state (the backend
stays the user's), a notebook shows a returned figure inline, and nothing needs
closing.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from matplotlib.figure import Figure

from .metrics import Calibration
from .prior import GaussianMixture, mixture_log_density

__all__ = ["plot_compression", "plot_entropy_histograms", "plot_history", "plot_reliability", "plot_weights"]


def plot_weights(
    weights: torch.Tensor,
    mixture: GaussianMixture,
    path: str | os.PathLike[str] | None = None,
    *,
    title: str = "",
    bins: int = 200,
) -> Figure:
    """Histogram of the weights (log-scaled counts) with the mixture density overlaid.

    The density is scaled to expected counts per bin, N·Δ·p(w), so that curve and
    bars share one axis, as in Nowlan & Hinton (1992) and Ullrich et al. (2017).

    Parameters
    ----------
    weights : Tensor, any shape (flattened)
    mixture : GaussianMixture with fields of shape ``(J,)``
    path : path-like, optional
        Also write the figure there (format from the suffix, e.g. ``.png``).
    title : str
        Defaults to one naming the number of components.
    bins : int

    Returns
    -------
    Figure
    """
    values = weights.detach().reshape(-1).double().cpu()
    mixture = GaussianMixture(*(t.detach().double().cpu() for t in mixture))
    low = min(float(values.min()), float((mixture.means - 3 * mixture.scales).min()))
    high = max(float(values.max()), float((mixture.means + 3 * mixture.scales).max()))
    edges = np.linspace(low, high, bins + 1)
    grid = torch.linspace(low, high, 2000, dtype=torch.float64)
    expected = values.numel() * (edges[1] - edges[0]) * mixture_log_density(grid, mixture).exp()

    figure = Figure(figsize=(8, 4.5), layout="tight")
    axis = figure.subplots()
    axis.hist(values.numpy(), bins=edges, color="tab:blue", alpha=0.6, label=f"weights (N={values.numel():,})")
    axis.plot(grid.numpy(), expected.numpy(), color="tab:red", lw=1.5, label="mixture prior (expected counts)")
    for mean, proportion in zip(mixture.means.tolist(), mixture.proportions.tolist()):
        axis.axvline(mean, color="tab:red", lw=0.6, alpha=0.3 + 0.7 * proportion**0.5)
    axis.set_yscale("log")
    axis.set_ylim(bottom=0.5)
    axis.set_xlabel("weight value")
    axis.set_ylabel("count per bin (log scale)")
    axis.set_title(title or f"Weights and learned mixture ({mixture.means.numel()} components)")
    axis.legend(loc="upper right")
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure


def plot_history(
    history: list[dict],
    path: str | os.PathLike[str] | None = None,
    *,
    metric: str,
    group: str,
) -> Figure:
    """Training curves: loss, the test metric, and the mixture means over epochs.

    The means' panel draws each component with opacity growing with its π, so
    components that die out fade, as in Ullrich et al.'s Figure 2.

    Parameters
    ----------
    history : list of dict
        Records from :func:`~bayes_sws.inference.fit_map`.
    path : path-like, optional
        Also write the figure there (format from the suffix, e.g. ``.png``).
    metric : str
        The history key of the metric to draw (``test_accuracy``, ``valid_arv`` …).
    group : str
        The mixture group whose means to draw.

    Returns
    -------
    Figure
    """
    epochs = [record["epoch"] for record in history]
    means = np.array([record["mixtures"][group]["mu"] for record in history])
    proportions = np.array([record["mixtures"][group]["pi"] for record in history])
    figure = Figure(figsize=(13, 3.8), layout="tight")
    axes = figure.subplots(1, 3)
    axes[0].plot(epochs, [record["loss"] for record in history], marker=".")
    axes[0].set_ylabel("objective per training example")
    axes[1].plot(epochs, [record[metric] for record in history], marker=".", color="tab:green")
    axes[1].set_ylabel(f"test {metric}")
    for component in range(means.shape[1]):
        alpha = float(np.clip(proportions[:, component].max() ** 0.5, 0.1, 1.0))
        axes[2].plot(epochs, means[:, component], color="tab:red", alpha=alpha)
    axes[2].set_ylabel("component means μ_j")
    for axis in axes:
        axis.set_xlabel("epoch")
    if path is not None:
        figure.savefig(path, dpi=110)
    return figure


def plot_reliability(
    calibration: Calibration,
    path: str | os.PathLike[str] | None = None,
    *,
    title: str = "",
) -> Figure:
    """Reliability diagram: accuracy against confidence per bin, with the bins' counts below.

    Parameters
    ----------
    calibration : Calibration
        From :func:`~bayes_sws.metrics.calibration`.
    path : path-like, optional
        Also write the figure there (format from the suffix, e.g. ``.png``).
    title : str
        Defaults to one stating the ECE.

    Returns
    -------
    Figure
    """
    edges = calibration.edges.numpy()
    widths = np.diff(edges)
    occupied = calibration.counts.numpy() > 0
    figure = Figure(figsize=(5, 6), layout="tight")
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(edges[:-1][occupied], calibration.accuracy.numpy()[occupied], width=widths[occupied],
            align="edge", color="tab:blue", edgecolor="black", alpha=0.7, label="accuracy")
    top.bar(edges[:-1][occupied], (calibration.confidence - calibration.accuracy).numpy()[occupied],
            bottom=calibration.accuracy.numpy()[occupied], width=widths[occupied], align="edge",
            fill=False, hatch="//", edgecolor="tab:red", lw=0, label="gap to confidence")  # unfilled: no blend
    top.plot([0, 1], [0, 1], color="gray", ls="--", lw=1, label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left")
    top.set_title(title or f"Reliability (ECE = {calibration.ece:.4f}, {len(widths)} bins)")
    bottom.bar(edges[:-1], calibration.counts.numpy(), width=widths, align="edge", color="gray")
    bottom.set_yscale("log")
    bottom.set_xlabel("confidence (max predictive probability)")
    bottom.set_ylabel("count")
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure


def plot_entropy_histograms(
    entropies: dict[str, torch.Tensor],
    path: str | os.PathLike[str] | None = None,
    *,
    n_classes: int,
    title: str = "",
    bins: int = 40,
) -> Figure:
    """Histograms (densities) of the predictive entropy, one per named set of inputs.

    Parameters
    ----------
    entropies : dict of str to Tensor ``(B_k,)``
        E.g. ``{"test (in-distribution)": ..., "mnist": ..., "noise": ...}``, in nats.
    path : path-like, optional
        Also write the figure there (format from the suffix, e.g. ``.png``).
    n_classes : int
        Sets the axis' upper end, log C (the largest possible entropy).
    title : str
    bins : int

    Returns
    -------
    Figure
    """
    edges = np.linspace(0.0, np.log(n_classes), bins + 1)
    figure = Figure(figsize=(7, 4), layout="tight")
    axis = figure.subplots()
    for name, values in entropies.items():
        clipped = np.clip(values.detach().double().cpu().numpy(), edges[0], edges[-1])  # rounding past log C
        axis.hist(clipped, bins=edges, density=True, histtype="stepfilled",
                  alpha=0.4, label=f"{name} (n={values.numel():,})")
    axis.set_xlabel("predictive entropy (nats)")
    axis.set_ylabel("density")
    axis.set_title(title or "Predictive entropy in and out of distribution")
    axis.legend(loc="upper center")
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure


def plot_compression(
    pretrained: torch.Tensor,
    retrained: torch.Tensor,
    components: torch.Tensor,
    quantised: torch.Tensor,
    path: str | os.PathLike[str] | None = None,
    *,
    title: str = "",
) -> Figure:
    """Ullrich et al.'s Figure 1: each weight before against after retraining, and the result.

    Left, every weight's pretrained value (x) against its retrained value (y),
    coloured by the component (or codebook entry) it was assigned to, zero in grey;
    right, the histogram of the compressed weights (log-scaled counts).

    Parameters
    ----------
    pretrained, retrained, components, quantised : Tensor ``(N,)``
        Each weight's pretrained and retrained value, its component index and its
        compressed value.
    path : path-like, optional
    title : str

    Returns
    -------
    Figure
    """
    before, after = pretrained.detach().reshape(-1).cpu().numpy(), retrained.detach().reshape(-1).cpu().numpy()
    labels = components.reshape(-1).cpu().numpy()
    values = quantised.detach().reshape(-1).cpu().numpy()
    figure = Figure(figsize=(12, 4.8), layout="tight")
    left, right = figure.subplots(1, 2)
    zero = labels == 0
    left.scatter(before[zero], after[zero], s=1, color="0.6", alpha=0.4, label="zero component", rasterized=True)
    left.scatter(before[~zero], after[~zero], s=1, c=labels[~zero], cmap="tab20", alpha=0.6, rasterized=True)
    left.set_xlabel("pretrained weight")
    left.set_ylabel("retrained weight")
    left.legend(loc="upper left", markerscale=8)
    right.hist(values, bins=200, color="tab:blue", alpha=0.7)
    right.set_yscale("log")
    right.set_ylim(bottom=0.5)
    right.set_xlabel("compressed weight value")
    right.set_ylabel("count per bin (log scale)")
    right.set_title(f"{int((values != 0).sum()):,} of {values.size:,} non-zero, {len(np.unique(values))} distinct values")
    figure.suptitle(title or "Weights before and after compression")
    if path is not None:
        figure.savefig(path, dpi=110)
    return figure
