"""Bayesian linear regression with a known Gaussian prior and noise: the analytic posterior to test against.

y = X w + ε, ε ~ N(0, s²), w ~ N(0, 1/p I): the posterior is N(m, A⁻¹) with
A = Xᵀ X / s² + λ p I (λ the prior weight, the prior tempered) and m = A⁻¹ Xᵀ y / s².
The model is the soft weight-sharing model with one component at zero (M = 1) whose
precision has a Gamma(10⁴, 10⁴/p) hyperprior: fixed at p to within 1 %.
"""

import torch
from torch import nn

from bayes_sws.data import Dataset
from bayes_sws.model import Gaussian, SoftWeightSharingModel
from bayes_sws.prior import Hyperpriors, SoftWeightSharingPrior

F64 = torch.float64
NOISE = 0.5
PRIOR_PRECISION = 1.0
N, D = 40, 3


def dataset() -> Dataset:
    """Correlated inputs, so a mean-field guide has correlations to miss."""
    g = torch.Generator().manual_seed(0)
    mixing = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.5, 0.3, 0.8]], dtype=F64)
    x = torch.randn(N, D, generator=g, dtype=F64) @ mixing.T
    y = x @ torch.tensor([1.0, -0.5, 0.3], dtype=F64) + NOISE * torch.randn(N, generator=g, dtype=F64)
    return Dataset(name="linear", task="regression", train_x=x, train_y=y, test_x=x[:5], test_y=y[:5],
                   n_classes=None)


def model(prior_weight: float = 1.0, prior_precision: float = PRIOR_PRECISION) -> SoftWeightSharingModel:
    shape = 1e4
    prior = SoftWeightSharingPrior(n_components=1, zero_component=True, init_scale=prior_precision ** -0.5,
                                   hyperpriors=Hyperpriors(precision_gamma=(shape, shape / prior_precision)))
    torch.manual_seed(0)
    return SoftWeightSharingModel(nn.Linear(D, 1, bias=False).to(F64), prior=prior,
                                  likelihood=Gaussian(noise_scale=NOISE), prior_weight=prior_weight)


def posterior(data: Dataset, prior_weight: float = 1.0, prior_precision: float = PRIOR_PRECISION,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The analytic posterior mean ``(D,)``, covariance ``(D, D)`` and precision matrix A ``(D, D)``."""
    x, y = data.train_x, data.train_y
    precision = x.T @ x / NOISE**2 + prior_weight * prior_precision * torch.eye(D, dtype=F64)
    covariance = torch.linalg.inv(precision)
    return covariance @ x.T @ y / NOISE**2, covariance, precision


def weight_draws(samples) -> torch.Tensor:
    """Flattened weight draws ``(draws, D)`` from PosteriorSamples."""
    return samples.flat()["weight"].reshape(-1, D)
