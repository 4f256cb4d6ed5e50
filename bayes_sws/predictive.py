"""The posterior predictive from S weight draws at once.

The network runs on all S draws together (:meth:`SoftWeightSharingModel.outputs`,
vectorised over draws), over the inputs in chunks so memory stays bounded, and
each chunk is reduced at once:

    classification  p̄(y|x) = (1/S) Σ_s p(y|x, w_s)
                    predictive entropy H[p̄]  =  expected entropy (1/S) Σ_s H[p(·|x, w_s)]
                                               + mutual information I(y; w | x)  (epistemic)
    regression      mean m̄ = (1/S) Σ_s m_s,  variance = Var_s(m_s) + (1/S) Σ_s σ_s²

Entropies are in nats. A MAP fit is one draw: its mutual information is zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .model import SoftWeightSharingModel

__all__ = [
    "ClassificationPredictive",
    "RegressionPredictive",
    "classification_predictive",
    "predict",
    "regression_predictive",
]


@dataclass(frozen=True)
class ClassificationPredictive:
    """The posterior predictive of a classifier on B inputs from S weight draws.

    Attributes
    ----------
    probabilities : Tensor ``(B, C)``
        The mean predictive probabilities p̄(y|x).
    entropy : Tensor ``(B,)``
        Predictive entropy H[p̄] (total uncertainty).
    expected_entropy : Tensor ``(B,)``
        Mean entropy of the single-draw predictives (aleatoric part).
    mutual_information : Tensor ``(B,)``
        ``entropy − expected_entropy`` (epistemic part), ≥ 0.
    log_likelihood : Tensor ``(S, B)`` or None
        log p(y_b | x_b, w_s) per draw and observation, when targets were given.
    replicates : Tensor ``(S, B)`` or None
        One predictive draw of y per weight draw (int64), when a generator was given.
    """

    probabilities: torch.Tensor
    entropy: torch.Tensor
    expected_entropy: torch.Tensor
    mutual_information: torch.Tensor
    log_likelihood: torch.Tensor | None = None
    replicates: torch.Tensor | None = None


@dataclass(frozen=True)
class RegressionPredictive:
    """The posterior predictive of a Gaussian regression on B inputs from S weight draws.

    Attributes
    ----------
    mean : Tensor ``(B,)``
        Predictive mean, the mean over draws of the network's output.
    epistemic_variance : Tensor ``(B,)``
        Variance over draws of the network's output (population variance, 1/S).
    noise_variance : Tensor ``(B,)``
        Mean over draws of the likelihood's noise variance σ_s².
    log_likelihood : Tensor ``(S, B)`` or None
        log N(y_b | m_sb, σ_s²) per draw and observation, when targets were given.
    replicates : Tensor ``(S, B)`` or None
        One predictive draw of y per weight draw, when a generator was given.
    """

    mean: torch.Tensor
    epistemic_variance: torch.Tensor
    noise_variance: torch.Tensor
    log_likelihood: torch.Tensor | None = None
    replicates: torch.Tensor | None = None

    @property
    def variance(self) -> torch.Tensor:
        """Total predictive variance ``(B,)``: epistemic plus noise."""
        return self.epistemic_variance + self.noise_variance


def classification_predictive(
    log_probabilities: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> ClassificationPredictive:
    """Reduce per-draw class log-probabilities to the predictive and its uncertainties.

    Parameters
    ----------
    log_probabilities : Tensor ``(S, B, C)``
        log p(c | x_b, w_s), normalised over C (``-inf`` allowed for probability 0).
    targets : Tensor ``(B,)`` of int64, optional
        Observed classes: gives ``log_likelihood``.
    generator : torch.Generator, optional
        Gives ``replicates``, one sampled class per draw and input.

    Returns
    -------
    ClassificationPredictive
    """
    probabilities = log_probabilities.exp()
    mean = probabilities.mean(0)
    entropy = torch.special.entr(mean).sum(-1)
    expected_entropy = torch.special.entr(probabilities).sum(-1).mean(0)
    log_likelihood = None
    if targets is not None:
        index = targets.long().expand(log_probabilities.shape[0], -1).unsqueeze(-1)
        log_likelihood = log_probabilities.gather(-1, index).squeeze(-1)
    replicates = None
    if generator is not None:
        flat = probabilities.reshape(-1, probabilities.shape[-1]).double()
        replicates = torch.multinomial(flat.cpu(), 1, generator=generator).reshape(probabilities.shape[:-1])
        replicates = replicates.to(probabilities.device)
    return ClassificationPredictive(
        probabilities=mean,
        entropy=entropy,
        expected_entropy=expected_entropy,
        mutual_information=(entropy - expected_entropy).clamp_min(0.0),
        log_likelihood=log_likelihood,
        replicates=replicates,
    )


def regression_predictive(
    means: torch.Tensor,
    noise_scales: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> RegressionPredictive:
    """Reduce per-draw Gaussian predictions to the predictive mean and variance.

    Parameters
    ----------
    means : Tensor ``(S, B)``
        The network's output m_sb per draw.
    noise_scales : Tensor ``(S,)``
        The likelihood's noise σ_s per draw.
    targets : Tensor ``(B,)``, optional
        Observed values: gives ``log_likelihood``.
    generator : torch.Generator, optional
        Gives ``replicates``, y_sb ~ N(m_sb, σ_s²).

    Returns
    -------
    RegressionPredictive
    """
    scales = noise_scales.reshape(-1, 1).expand_as(means)
    log_likelihood = None
    if targets is not None:
        log_likelihood = torch.distributions.Normal(means, scales).log_prob(targets.expand_as(means))
    replicates = None
    if generator is not None:
        noise = torch.randn(means.shape, generator=generator, dtype=means.dtype).to(means.device)
        replicates = means + scales * noise
    return RegressionPredictive(
        mean=means.mean(0),
        epistemic_variance=means.var(0, correction=0),
        noise_variance=scales.pow(2).mean(0),
        log_likelihood=log_likelihood,
        replicates=replicates,
    )


def predict(
    model: SoftWeightSharingModel,
    draws: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    seed: int | None = None,
    progress: bool = False,
) -> ClassificationPredictive | RegressionPredictive:
    """The posterior predictive of ``model`` on ``x`` from S weight draws, all draws at once.

    Parameters
    ----------
    model : SoftWeightSharingModel
    draws : mapping of str to Tensor
        Each site's S draws, ``(S, *site_shape)`` (e.g. ``PosteriorSamples.flat()``);
        the prior sites are needed, and ``noise_scale`` for a Gaussian likelihood that learns it.
    x : Tensor ``(B, *input_shape)``
    y : Tensor ``(B,)``, optional
        Targets: the result then holds the per-draw log-likelihood ``(S, B)``.
    chunk_size : int, optional
        Inputs per network call; memory grows as S × chunk_size × the widest layer.
        Defaults to keeping S × chunk_size ≤ 8192 network evaluations.
    seed : int, optional
        Seeds the posterior predictive replicates ``(S, B)``; ``None`` draws none.
    progress : bool
        Show a progress bar over chunks.

    Returns
    -------
    ClassificationPredictive or RegressionPredictive, after ``model.likelihood.task``.

    Raises
    ------
    ValueError
        If ``x`` is empty or holds NaN, or the draws are not shaped ``(S, *site_shape)``.
    """
    parameters = {name: draws[name].to(x.device) for name in model.prior_sites}
    n_draws = next(iter(parameters.values())).shape[0]
    chunk_size = chunk_size or max(1, _EVALUATIONS_PER_CALL // n_draws)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if x.shape[0] == 0:
        raise ValueError("predict needs at least one input")
    if torch.isnan(x).any():
        raise ValueError("predict's inputs hold NaN")
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    classification = model.likelihood.task == "classification"
    noise_scales = None if classification else _noise_scales(model, draws, n_draws, like=x)
    parts = []
    starts = range(0, x.shape[0], chunk_size)
    with torch.no_grad():
        for start in tqdm(starts, desc="predicting", unit="chunk", disable=not progress, leave=False):
            chunk = slice(start, start + chunk_size)
            targets = None if y is None else y[chunk]
            outputs = model.outputs(parameters, x[chunk])
            if n_draws == 1:  # model.outputs reads a single leading 1 as the data plate's dimension
                outputs = outputs.unsqueeze(0)
            if outputs.shape[0] != n_draws:  # a site without a draws dimension
                raise ValueError(f"draws must be shaped (S, *site_shape); outputs came out {tuple(outputs.shape)}")
            if classification:
                parts.append(classification_predictive(outputs.log_softmax(-1), targets, generator=generator))
            else:
                means = outputs.reshape(n_draws, outputs.shape[1])
                parts.append(regression_predictive(means, noise_scales, targets, generator=generator))
    return _concatenate(parts)


def _noise_scales(model: SoftWeightSharingModel, draws: Mapping[str, torch.Tensor], n_draws: int, *,
                  like: torch.Tensor) -> torch.Tensor:
    """σ per draw ``(S,)``: the fixed noise scale, or the ``noise_scale`` site's draws."""
    fixed = model.likelihood.noise_scale
    if fixed is not None:
        return like.new_full((n_draws,), fixed)
    if "noise_scale" not in draws:
        raise ValueError("the likelihood learns its noise scale: the draws need a 'noise_scale' site")
    return draws["noise_scale"].to(like.device, like.dtype).reshape(n_draws)


def _concatenate(parts: list) -> ClassificationPredictive | RegressionPredictive:
    kind = type(parts[0])
    fields = {}
    for name in kind.__dataclass_fields__:
        pieces = [getattr(part, name) for part in parts]
        # per-draw fields are (S, B): chunks of inputs join along dimension 1
        fields[name] = None if pieces[0] is None else torch.cat(pieces, dim=1 if name in _PER_DRAW else 0)
    return kind(**fields)


_PER_DRAW = ("log_likelihood", "replicates")
_EVALUATIONS_PER_CALL = 8192
