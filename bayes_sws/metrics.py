"""Scores of predictive distributions: accuracy, NLL, Brier, calibration, OOD detection, ARV.

Every function takes predictive probabilities ``(B, C)`` (e.g.
:attr:`~bayes_sws.predictive.ClassificationPredictive.probabilities`) or
per-example scores, and returns plain floats (or a small dataclass), so results
go straight into JSON. A NaN among the inputs is a ``ValueError``, not a score
(NaN would otherwise rank, bin or argmax as if it were a number).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "Calibration",
    "accuracy",
    "average_relative_variance",
    "brier_score",
    "calibration",
    "classification_metrics",
    "gaussian_nll",
    "negative_log_likelihood",
    "ood_auroc",
]


def _refuse_nan(name: str, tensor: torch.Tensor) -> None:
    if torch.isnan(tensor).any():
        raise ValueError(f"{name} hold NaN: a diverged fit or NaN inputs upstream")


def accuracy(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of inputs whose most probable class is the label (probabilities ``(B, C)``, labels ``(B,)``)."""
    _refuse_nan("probabilities", probabilities)
    return float((probabilities.argmax(-1) == labels).double().mean())


def negative_log_likelihood(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean −log p̄(y_b | x_b) over the B inputs, in nats (probability 0 counts as −log of the smallest float)."""
    _refuse_nan("probabilities", probabilities)
    chosen = probabilities.double().gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    return float(-chosen.clamp_min(torch.finfo(torch.float64).tiny).log().mean())


def brier_score(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over inputs of Σ_c (p_bc − 1[y_b = c])², in [0, 2]."""
    _refuse_nan("probabilities", probabilities)
    one_hot = torch.nn.functional.one_hot(labels.long(), probabilities.shape[-1]).double()
    return float((probabilities.double() - one_hot).pow(2).sum(-1).mean())


@dataclass(frozen=True)
class Calibration:
    """Expected calibration error and the reliability diagram's data.

    Attributes
    ----------
    ece : float
        Σ_m (n_m / B) |accuracy_m − confidence_m| over the bins.
    edges : Tensor ``(M + 1,)``
        Bin edges, equally spaced on [0, 1]; bin m holds confidences in (edges[m], edges[m+1]]
        (the first also holds 0).
    confidence : Tensor ``(M,)``
        Mean max-probability in each bin (NaN where the bin is empty).
    accuracy : Tensor ``(M,)``
        Fraction correct in each bin (NaN where empty).
    counts : Tensor ``(M,)`` of int64
        Inputs per bin.
    """

    ece: float
    edges: torch.Tensor
    confidence: torch.Tensor
    accuracy: torch.Tensor
    counts: torch.Tensor


def calibration(probabilities: torch.Tensor, labels: torch.Tensor, *, n_bins: int = 15) -> Calibration:
    """Calibration of the max-probability confidence in ``n_bins`` equal-width bins (Guo et al. 2017).

    Parameters
    ----------
    probabilities : Tensor ``(B, C)``
    labels : Tensor ``(B,)``
    n_bins : int

    Returns
    -------
    Calibration
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be positive, got {n_bins}")
    _refuse_nan("probabilities", probabilities)
    confidence, predicted = probabilities.double().max(-1)
    correct = (predicted == labels).double()
    bins = (confidence * n_bins).ceil().long().sub(1).clamp(0, n_bins - 1)
    counts = torch.bincount(bins, minlength=n_bins)
    confidence_sum = torch.zeros(n_bins, dtype=torch.float64, device=bins.device).index_add_(0, bins, confidence)
    correct_sum = torch.zeros(n_bins, dtype=torch.float64, device=bins.device).index_add_(0, bins, correct)
    occupied = counts.double()
    mean_confidence = confidence_sum / occupied
    mean_accuracy = correct_sum / occupied
    gaps = (correct_sum - confidence_sum).abs()  # n_m |acc_m − conf_m|, zero for empty bins
    return Calibration(
        ece=float(gaps.sum() / confidence.numel()),
        edges=torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64),
        confidence=mean_confidence.cpu(),
        accuracy=mean_accuracy.cpu(),
        counts=counts.cpu(),
    )


def ood_auroc(in_distribution: torch.Tensor, out_of_distribution: torch.Tensor) -> float:
    """Area under the ROC curve for telling OOD inputs (positives) by a higher score, e.g. entropy.

    Equals the Mann-Whitney statistic P(s_out > s_in) + ½ P(s_out = s_in): ties count half.

    Parameters
    ----------
    in_distribution : Tensor ``(B_in,)``
        Scores of in-distribution inputs (negatives).
    out_of_distribution : Tensor ``(B_out,)``
        Scores of out-of-distribution inputs (positives).

    Returns
    -------
    float in [0, 1]; 0.5 is chance.
    """
    negatives = in_distribution.reshape(-1).double().cpu()
    positives = out_of_distribution.reshape(-1).double().cpu()
    _refuse_nan("in-distribution scores", negatives)
    _refuse_nan("out-of-distribution scores", positives)
    if negatives.numel() == 0 or positives.numel() == 0:
        raise ValueError("AUROC needs at least one in-distribution and one out-of-distribution score")
    scores = torch.cat([negatives, positives])
    values, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    # the average rank (1-based) of each distinct value, ties sharing the mean of their ranks
    upper = counts.cumsum(0).double()
    average_rank = upper - (counts.double() - 1) / 2
    positive_rank_sum = average_rank[inverse[negatives.numel():]].sum()
    n_pos, n_neg = positives.numel(), negatives.numel()
    return float((positive_rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(probabilities: torch.Tensor, labels: torch.Tensor, *, n_bins: int = 15) -> dict[str, float]:
    """``accuracy``, ``nll``, ``brier`` and ``ece`` of predictive probabilities ``(B, C)``."""
    return {
        "accuracy": accuracy(probabilities, labels),
        "nll": negative_log_likelihood(probabilities, labels),
        "brier": brier_score(probabilities, labels),
        "ece": calibration(probabilities, labels, n_bins=n_bins).ece,
    }


def gaussian_nll(mean: torch.Tensor, variance: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean −log N(y_b | mean_b, variance_b) over B targets, in nats (a moment-matched Gaussian predictive)."""
    mean, variance, targets = mean.double(), variance.double(), targets.double()
    for name, tensor in (("predictive means", mean), ("predictive variances", variance), ("targets", targets)):
        _refuse_nan(name, tensor)
    return float((0.5 * (math.log(2 * math.pi) + variance.log() + (targets - mean).pow(2) / variance)).mean())


def average_relative_variance(mean: torch.Tensor, targets: torch.Tensor, *, target_variance: float) -> float:
    """ARV: mean squared error of the predictions ``(B,)`` divided by ``target_variance`` (Weigend et al. 1990)."""
    _refuse_nan("predictions", mean)
    _refuse_nan("targets", targets)
    return float((mean.double() - targets.double()).pow(2).mean() / target_variance)
