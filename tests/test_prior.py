"""Tests of bayes_sws.prior against the mathematics of docs/objective.md, written out by hand.

Every expected value below is computed independently in plain float64 torch: the
mixture density from its definition, the responsibilities γ from π_j N_j / Σ_k π_k N_k,
the gradients from the corrected formulas of docs/objective.md §2, the EM objective from
λ Σ_i log p(w_i|θ) + log p(θ).
"""

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDelta
from torch.distributions import biject_to, transform_to

from bayes_sws.prior import (
    GaussianMixture,
    Hyperpriors,
    MixturePrior,
    SoftWeightSharingPrior,
    mixture_log_density,
    mixture_log_prob_sum,
    responsibilities,
)

F64 = torch.float64
LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


# --------------------------------------------------------------------------- helpers


def hand_component_densities(w, pi, mu, sigma):
    """π_j N(w_i | μ_j, σ_j²) from the definition (no log-sum-exp), shape (N, J)."""
    d = w.reshape(-1, 1) - mu
    return pi * torch.exp(-0.5 * d**2 / sigma**2) / (sigma * math.sqrt(2.0 * math.pi))


def hand_log_density(w, pi, mu, sigma):
    """log Σ_j π_j N(w|μ_j,σ_j²) elementwise, by log-sum-exp of the written-out log terms."""
    d = w.unsqueeze(-1) - mu
    log_terms = torch.log(pi) - torch.log(sigma) - LOG_SQRT_2PI - 0.5 * (d / sigma) ** 2
    return torch.logsumexp(log_terms, dim=-1)


def omega_paths():
    """The three ways to get Σ_i log p(w_i) from the library, each as f(w, mixture) -> scalar."""
    return {
        "reference": lambda w, m: mixture_log_density(w, m).sum(),
        "fused": lambda w, m: mixture_log_prob_sum(w.reshape(1, -1), m)[0],
        "fused_chunked": lambda w, m: mixture_log_prob_sum(w.reshape(1, -1), m, chunk_size=7)[0],
        "distribution": lambda w, m: MixturePrior(m, event_shape=w.shape).log_prob(w),
    }


PATHS = omega_paths()


def value_and_grads(fn, tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    value = fn(*leaves)
    grads = torch.autograd.grad(value, leaves)
    return value.detach(), grads


def random_mixture_params(generator, j=4):
    eta = torch.randn(j, generator=generator, dtype=F64)
    mu = torch.randn(j, generator=generator, dtype=F64)
    sigma = 0.3 + torch.rand(j, generator=generator, dtype=F64)
    return eta, mu, sigma


# --------------------------------------------------------------------------- Ω and its gradients


@pytest.mark.parametrize("path", list(PATHS))
def test_autograd_gradients_of_omega_equal_corrected_analytic_formulas(path, kernel_backend):
    g = torch.Generator().manual_seed(1)
    n, j = 37, 4
    w = 1.5 * torch.randn(n, generator=g, dtype=F64)
    eta, mu, sigma = random_mixture_params(g, j)

    def omega(w, eta, mu, sigma):
        mixture = GaussianMixture(torch.log_softmax(eta, 0), mu, sigma)
        return -PATHS[path](w, mixture)

    value, (dw, deta, dmu, dsigma) = value_and_grads(omega, (w, eta, mu, sigma))

    pi = torch.exp(eta) / torch.exp(eta).sum()
    comp = hand_component_densities(w, pi, mu, sigma)  # (N, J)
    gamma = comp / comp.sum(1, keepdim=True)
    d = w[:, None] - mu  # w_i − μ_j
    expected_value = -torch.log(comp.sum(1)).sum()
    expected_dw = (gamma * d / sigma**2).sum(1)
    expected_dmu = (gamma * (-d) / sigma**2).sum(0)
    expected_dsigma = (gamma * (1.0 / sigma - d**2 / sigma**3)).sum(0)
    expected_deta = (pi - gamma).sum(0)

    torch.testing.assert_close(value, expected_value, rtol=1e-12, atol=0)
    torch.testing.assert_close(dw, expected_dw, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dmu, expected_dmu, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dsigma, expected_dsigma, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(deta, expected_deta, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", list(PATHS))
def test_gradient_of_omega_in_log_variance_equals_half_gamma_times_one_minus_standardised_square(path):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(25, generator=g, dtype=F64)
    eta, mu, sigma = random_mixture_params(g, 3)
    xi = torch.log(sigma**2)

    def omega(xi):
        mixture = GaussianMixture(torch.log_softmax(eta, 0), mu, torch.exp(0.5 * xi))
        return -PATHS[path](w, mixture)

    _, (dxi,) = value_and_grads(omega, (xi,))
    pi = torch.softmax(eta, 0)
    comp = hand_component_densities(w, pi, mu, sigma)
    gamma = comp / comp.sum(1, keepdim=True)
    expected = 0.5 * (gamma * (1 - (w[:, None] - mu) ** 2 / sigma**2)).sum(0)
    torch.testing.assert_close(dxi, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", list(PATHS))
def test_single_zero_mean_component_makes_omega_weight_decay(path):
    g = torch.Generator().manual_seed(3)
    n = 50
    w = torch.randn(n, generator=g, dtype=F64)
    sigma = torch.tensor([0.7], dtype=F64)
    mixture = GaussianMixture(torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64), sigma)

    value, (dw,) = value_and_grads(lambda w: -PATHS[path](w, mixture), (w,))

    s = float(sigma)
    expected = (w @ w) / (2 * s**2) + n * math.log(s * math.sqrt(2 * math.pi))
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(dw, w / s**2, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- fused vs reference


def extreme_case(dtype=F64):
    """μ random, σ over 1e-4..10, π with a 1e-12 and a 0.999999 weight, weights far in the tails."""
    g = torch.Generator().manual_seed(4)
    j = 6
    mu = 3 * torch.randn(j, generator=g, dtype=F64)
    sigma = torch.logspace(-4, 1, j, dtype=F64)
    log_weights = torch.log_softmax(
        torch.tensor([1e-12, 0.999999, 0.3, 0.1, 0.2, 0.4], dtype=F64).log(), 0
    )
    w = torch.cat(
        [
            torch.randn(600, generator=g, dtype=F64),
            mu + 0.5 * sigma,  # right on top of the narrow components
            torch.tensor([1e3, -1e3, 5e2, -3e2, 0.0], dtype=F64),
            torch.linspace(-20, 20, 95, dtype=F64),
        ]
    )
    # Round to the working precision so that every dtype sees the same numbers.
    return [t.to(dtype).to(F64) for t in (w, log_weights, mu, sigma)]


def reference_sum(w, lw, mu, sigma):
    return mixture_log_density(w, GaussianMixture(lw, mu, sigma)).sum()


def fused_sum(w, lw, mu, sigma):
    return mixture_log_prob_sum(w.reshape(1, -1), GaussianMixture(lw, mu, sigma), chunk_size=64)[0]


def assert_close_to_reference(actual, expected, rtol):
    """Elementwise rtol, with an absolute slack of rtol × the largest entry."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual.to(F64), expected, rtol=rtol, atol=rtol * scale)


def test_fused_log_prob_sum_equals_reference_in_float64_at_extreme_parameters(kernel_backend):
    tensors = extreme_case()
    ref_value, ref_grads = value_and_grads(reference_sum, tensors)
    value, grads = value_and_grads(fused_sum, tensors)

    # The reference itself is right: log-sum-exp of the written-out log terms.
    w, lw, mu, sigma = tensors
    torch.testing.assert_close(ref_value, hand_log_density(w, lw.exp(), mu, sigma).sum(), rtol=1e-12, atol=0)

    assert torch.isfinite(value) and all(torch.isfinite(gr).all() for gr in grads)
    assert_close_to_reference(value, ref_value, 1e-10)
    for grad, ref_grad in zip(grads, ref_grads):
        assert_close_to_reference(grad, ref_grad, 1e-10)


def test_fused_log_prob_sum_in_float32_matches_float64_reference_to_float32_round_off(kernel_backend):
    tensors = extreme_case(torch.float32)
    ref_value, ref_grads = value_and_grads(reference_sum, tensors)
    value, grads = value_and_grads(fused_sum, [t.float() for t in tensors])

    assert value.dtype == torch.float32
    assert torch.isfinite(value) and all(torch.isfinite(gr).all() for gr in grads)
    assert_close_to_reference(value, ref_value, 1e-5)
    for grad, ref_grad in zip(grads, ref_grads):
        assert grad.dtype == torch.float32
        assert_close_to_reference(grad, ref_grad, 1e-5)


def test_chunk_size_smaller_than_n_gives_same_value_and_gradients_as_one_chunk(kernel_backend):
    g = torch.Generator().manual_seed(5)
    n = 1001  # not a multiple of 64
    w = 2 * torch.randn(n, generator=g, dtype=F64)
    eta, mu, sigma = random_mixture_params(g, 5)
    lw = torch.log_softmax(eta, 0)

    def chunked(chunk):
        return lambda w, lw, mu, sigma: mixture_log_prob_sum(
            w.reshape(1, -1), GaussianMixture(lw, mu, sigma), chunk_size=chunk
        )[0]

    one_value, one_grads = value_and_grads(chunked(n), (w, lw, mu, sigma))
    value, grads = value_and_grads(chunked(64), (w, lw, mu, sigma))
    torch.testing.assert_close(value, one_value, rtol=1e-12, atol=0)
    for grad, one_grad in zip(grads, one_grads):
        torch.testing.assert_close(grad, one_grad, rtol=1e-12, atol=1e-12)
    # Without gradients (the value-only kernel) the chunked sum is the same too.
    with torch.no_grad():
        torch.testing.assert_close(chunked(64)(w, lw, mu, sigma), one_value, rtol=1e-12, atol=0)
    # And both equal the hand-written density.
    torch.testing.assert_close(one_value, hand_log_density(w, lw.exp(), mu, sigma).sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("shape, event_dim", [((4, 10), 1), ((2, 3, 4, 5), 2), ((7,), 1)])
def test_sums_over_event_dims_give_one_sum_and_gradient_per_batch_element(shape, event_dim, chunk_size,
                                                                          kernel_backend):
    g = torch.Generator().manual_seed(6)
    w = torch.randn(shape, generator=g, dtype=F64)
    eta, mu, sigma = random_mixture_params(g, 3)
    lw = torch.log_softmax(eta, 0)
    batch_shape = shape[: len(shape) - event_dim]
    cotangent = torch.randn(batch_shape, generator=g, dtype=F64)

    def fused(w, lw, mu, sigma):
        sums = mixture_log_prob_sum(w, GaussianMixture(lw, mu, sigma), event_dim=event_dim, chunk_size=chunk_size)
        assert sums.shape == batch_shape
        return (cotangent * sums).sum()

    def by_hand_sums(w, lw, mu, sigma):
        return hand_log_density(w, lw.exp(), mu, sigma).flatten(len(batch_shape)).sum(-1)

    def by_hand(w, lw, mu, sigma):
        return (cotangent * by_hand_sums(w, lw, mu, sigma)).sum()

    with torch.no_grad():
        sums = mixture_log_prob_sum(w, GaussianMixture(lw, mu, sigma), event_dim=event_dim, chunk_size=chunk_size)
    torch.testing.assert_close(sums, by_hand_sums(w, lw, mu, sigma), rtol=1e-12, atol=0)
    value, grads = value_and_grads(fused, (w, lw, mu, sigma))
    expected_value, expected_grads = value_and_grads(by_hand, (w, lw, mu, sigma))
    torch.testing.assert_close(value, expected_value, rtol=1e-12, atol=1e-12)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_hessian_of_mixture_prior_log_prob_equals_the_reference_hessian(kernel_backend):
    g = torch.Generator().manual_seed(22)
    w = torch.randn(6, generator=g, dtype=F64)
    eta, mu, sigma = random_mixture_params(g, 3)

    def fused(w, eta, mu, sigma):
        return MixturePrior(GaussianMixture(torch.log_softmax(eta, 0), mu, sigma), event_shape=(6,)).log_prob(w)

    def reference(w, eta, mu, sigma):
        return hand_log_density(w, torch.softmax(eta, 0), mu, sigma).sum()

    hessian = torch.autograd.functional.hessian(fused, (w, eta, mu, sigma))
    expected = torch.autograd.functional.hessian(reference, (w, eta, mu, sigma))
    assert hessian[0][0].abs().max() > 1.0  # not the zero a once-differentiable backward gives
    for row, expected_row in zip(hessian, expected):
        for block, expected_block in zip(row, expected_row):
            torch.testing.assert_close(block, expected_block, rtol=1e-10, atol=1e-10)


def test_fused_sum_of_batched_mixtures_passes_gradcheck_and_gradgradcheck(kernel_backend):
    g = torch.Generator().manual_seed(23)
    w = torch.randn(3, 5, generator=g, dtype=F64)
    mixture = batched_mixture([(2, 1)] * 3, g)
    inputs = [t.clone().requires_grad_() for t in (w, *mixture)]

    def fused(w, *fields):
        return mixture_log_prob_sum(w, GaussianMixture(*fields), chunk_size=2)

    assert torch.autograd.gradcheck(fused, inputs)
    assert torch.autograd.gradgradcheck(fused, inputs)


def test_weight_gradient_is_a_tensor_of_its_own_so_autograd_can_add_into_it_in_place():
    w = torch.randn(3, 5, dtype=F64, requires_grad=True)
    log_prob = MixturePrior(small_mixture(), event_shape=(3, 5)).log_prob(w)
    (grad,) = torch.autograd.grad(log_prob, w)
    assert grad.shape == w.shape and not grad._is_view()


def test_mixture_prior_rejects_a_value_whose_trailing_shape_is_not_the_event_shape():
    prior = MixturePrior(small_mixture(), event_shape=(3, 5), validate_args=False)
    with pytest.raises(ValueError, match=r"does not end in the event shape \(3, 5\)"):
        prior.log_prob(torch.zeros(5, 3))


# --------------------------------------------------------------------------- MixturePrior


def small_mixture():
    return GaussianMixture(
        torch.log(torch.tensor([0.2, 0.5, 0.3], dtype=F64)),
        torch.tensor([-1.0, 0.0, 0.8], dtype=F64),
        torch.tensor([0.3, 0.1, 0.5], dtype=F64),
    )


def test_mixture_prior_log_prob_of_sample_batch_returns_one_sum_per_sample():
    mixture = small_mixture()
    prior = MixturePrior(mixture, event_shape=(2, 3))
    value = torch.randn(5, 2, 3, dtype=F64, generator=torch.Generator().manual_seed(7))
    log_prob = prior.log_prob(value)
    assert log_prob.shape == (5,)
    expected = hand_log_density(value, mixture.proportions, mixture.means, mixture.scales).sum((1, 2))
    torch.testing.assert_close(log_prob, expected, rtol=1e-12, atol=0)


def test_expanded_mixture_prior_keeps_parameters_of_shape_j_and_broadcasts_log_prob():
    mixture = small_mixture()
    prior = MixturePrior(mixture, event_shape=(2, 3)).expand((3,))
    assert prior.batch_shape == (3,) and prior.event_shape == (2, 3)
    assert prior.means.shape == prior.scales.shape == prior.log_proportions.shape == (3,)

    single = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(8))
    expected_single = hand_log_density(single, mixture.proportions, mixture.means, mixture.scales).sum()
    broadcast = prior.log_prob(single)
    assert broadcast.shape == (3,)
    torch.testing.assert_close(broadcast, expected_single.expand(3), rtol=1e-12, atol=0)

    batch = torch.randn(3, 2, 3, dtype=F64, generator=torch.Generator().manual_seed(9))
    expected_batch = hand_log_density(batch, mixture.proportions, mixture.means, mixture.scales).sum((1, 2))
    torch.testing.assert_close(prior.log_prob(batch), expected_batch, rtol=1e-12, atol=0)


def test_mixture_prior_samples_have_extended_shape_and_component_fractions_near_pi():
    torch.manual_seed(10)
    pi = torch.tensor([0.3, 0.7], dtype=F64)
    mixture = GaussianMixture(pi.log(), torch.tensor([-10.0, 10.0], dtype=F64), torch.tensor([0.1, 0.2], dtype=F64))
    prior = MixturePrior(mixture, event_shape=(2, 3))
    assert prior.sample((5,)).shape == (5, 2, 3)
    assert prior.sample().shape == (2, 3)

    samples = prior.sample((20000,))  # 120 000 draws
    assert samples.dtype == F64
    high = samples > 0
    # Every draw sits within 10σ of the mean of the component it came from.
    assert ((samples - 10).abs()[high] < 2.0).all() and ((samples + 10).abs()[~high] < 1.0).all()
    # Fraction of the second component: standard error sqrt(0.21/120000) ≈ 0.0013; 0.01 is > 7 s.e.
    assert abs(high.double().mean().item() - 0.7) < 0.01
    # Within-component spread matches σ (relative standard error ≈ 0.3 %).
    assert abs(samples[high].std().item() - 0.2) < 0.01
    assert abs(samples[~high].std().item() - 0.1) < 0.005


def test_mixture_prior_mean_and_variance_equal_mixture_moments():
    mixture = small_mixture()
    prior = MixturePrior(mixture, event_shape=(2,))
    pi, mu, sigma = mixture.proportions, mixture.means, mixture.scales
    mean = (pi * mu).sum()
    variance = (pi * (sigma**2 + mu**2)).sum() - mean**2
    torch.testing.assert_close(prior.mean, mean.expand(2), rtol=1e-12, atol=0)
    torch.testing.assert_close(prior.variance, variance.expand(2), rtol=1e-12, atol=0)


def batched_mixture(shapes, generator, j=3):
    """A GaussianMixture whose three fields have the leading shapes ``shapes``, normalised over J."""
    log_pi_shape, mu_shape, sigma_shape = shapes
    return GaussianMixture(
        torch.log_softmax(torch.randn(*log_pi_shape, j, generator=generator, dtype=F64), -1),
        torch.randn(*mu_shape, j, generator=generator, dtype=F64),
        0.3 + torch.rand(*sigma_shape, j, generator=generator, dtype=F64),
    )


def row_by_row_log_prob_sum(w, mixture, event_dim):
    """Σ log p over the event dims for every broadcast batch index, one hand-written mixture at a time."""
    split = w.dim() - event_dim
    batch = torch.broadcast_shapes(w.shape[:split], *(t.shape[:-1] for t in mixture))
    w = w.expand(batch + w.shape[split:])
    fields = [t.expand(*batch, t.shape[-1]) for t in mixture]
    sums = [
        hand_log_density(w[index].reshape(-1), fields[0][index].exp(), fields[1][index], fields[2][index]).sum()
        for index in itertools.product(*map(range, batch))
    ]
    return torch.stack(sums).reshape(batch) if sums else w.new_zeros(batch)


BROADCASTS = {
    # name: (weights shape, event_dim, leading shapes of log π, μ, σ)
    "particles": ((3, 1, 4, 5), 2, [(3, 1)] * 3),
    "one_mixture_many_weights": ((3, 4, 5), 2, [()] * 3),
    "many_mixtures_one_weights": ((4, 5), 2, [(3,)] * 3),
    "fields_of_different_batches": ((2, 7), 1, [(3, 1), (), (1, 2)]),
    "weights_and_mixture_both_broadcast": ((1, 2, 6), 1, [(3, 1)] * 3),
}


@pytest.mark.parametrize("case", list(BROADCASTS))
def test_batched_mixtures_broadcast_against_weights_and_gradients_sum_to_each_input_shape(case, kernel_backend):
    shape, event_dim, shapes = BROADCASTS[case]
    g = torch.Generator().manual_seed(19)
    w = torch.randn(shape, generator=g, dtype=F64)
    mixture = batched_mixture(shapes, g)
    expected_sums = row_by_row_log_prob_sum(w, mixture, event_dim)
    cotangent = torch.randn(expected_sums.shape, generator=g, dtype=F64)

    def fused(w, *fields):
        sums = mixture_log_prob_sum(w, GaussianMixture(*fields), event_dim=event_dim, chunk_size=4)
        assert sums.shape == expected_sums.shape
        return (cotangent * sums).sum()

    def by_hand(w, *fields):
        return (cotangent * row_by_row_log_prob_sum(w, fields, event_dim)).sum()

    with torch.no_grad():
        sums = mixture_log_prob_sum(w, mixture, event_dim=event_dim)
    torch.testing.assert_close(sums, expected_sums, rtol=1e-12, atol=0)
    value, grads = value_and_grads(fused, (w, *mixture))
    expected_value, expected_grads = value_and_grads(by_hand, (w, *mixture))
    torch.testing.assert_close(value, expected_value, rtol=1e-12, atol=1e-12)
    for grad, expected, leaf in zip(grads, expected_grads, (w, *mixture)):
        assert grad.shape == leaf.shape
        torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_mixture_prior_of_batched_mixtures_has_their_batch_shape_and_evaluates_each_row():
    g = torch.Generator().manual_seed(20)
    mixture = batched_mixture([(2, 1)] * 3, g)
    prior = MixturePrior(mixture, event_shape=(3,))
    assert prior.batch_shape == (2, 1) and prior.event_shape == (3,)
    expanded = prior.expand((2, 4))
    assert expanded.batch_shape == (2, 4) and expanded.means.shape == (2, 1, 3)

    value = torch.randn(2, 4, 3, generator=g, dtype=F64)
    torch.testing.assert_close(expanded.log_prob(value), row_by_row_log_prob_sum(value, mixture, 1), rtol=1e-12, atol=0)
    # One weight tensor under both mixtures: one log-density per mixture.
    torch.testing.assert_close(prior.log_prob(value[0, 0]), row_by_row_log_prob_sum(value[0, 0], mixture, 1),
                               rtol=1e-12, atol=0)

    pi, mu, sigma = mixture.proportions, mixture.means, mixture.scales
    mean = (pi * mu).sum(-1, keepdim=True)
    variance = (pi * (sigma**2 + mu**2)).sum(-1, keepdim=True) - mean**2
    torch.testing.assert_close(expanded.mean, mean.expand(2, 4, 3), rtol=1e-12, atol=0)
    torch.testing.assert_close(expanded.variance, variance.expand(2, 4, 3), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="do not broadcast"):
        prior.expand((3, 4))


def test_mixture_prior_samples_each_batch_row_from_its_own_mixture():
    torch.manual_seed(21)
    mixture = GaussianMixture(
        torch.tensor([[0.3, 0.7], [0.9, 0.1]], dtype=F64).log(),
        torch.tensor([[-10.0, 10.0], [100.0, 200.0]], dtype=F64),
        torch.tensor([[0.1, 0.2], [1.0, 2.0]], dtype=F64),
    )
    prior = MixturePrior(mixture, event_shape=(4, 5))
    assert prior.sample().shape == (2, 4, 5)
    samples = prior.sample((3000,))  # 60 000 draws per mixture
    assert samples.shape == (3000, 2, 4, 5) and samples.dtype == F64
    first, second = samples[:, 0], samples[:, 1]
    assert ((first.abs() - 10).abs() < 2.0).all()
    assert (((second - 100).abs() < 20) | ((second - 200).abs() < 40)).all()
    # Standard errors of the fractions are < 0.002; 0.01 is > 5 s.e.
    assert abs((first > 0).double().mean().item() - 0.7) < 0.01
    assert abs((second > 150).double().mean().item() - 0.1) < 0.01
    assert abs(second[second < 150].std().item() - 1.0) < 0.02


def test_responsibilities_sum_to_one_and_equal_normalised_weighted_densities():
    g = torch.Generator().manual_seed(11)
    eta, mu, sigma = random_mixture_params(g, 4)
    pi = torch.softmax(eta, 0)
    w = torch.randn(6, 5, generator=g, dtype=F64)
    gamma = responsibilities(w, GaussianMixture(pi.log(), mu, sigma))
    assert gamma.shape == (6, 5, 4)
    torch.testing.assert_close(gamma.sum(-1), torch.ones(6, 5, dtype=F64), rtol=1e-14, atol=1e-14)
    comp = hand_component_densities(w, pi, mu, sigma)
    expected = (comp / comp.sum(1, keepdim=True)).reshape(6, 5, 4)
    torch.testing.assert_close(gamma, expected, rtol=1e-12, atol=1e-15)


def test_mixture_same_family_site_runs_under_auto_delta_thanks_to_registered_support_transform():
    pyro.clear_param_store()
    mixture = dist.MixtureSameFamily(
        dist.Categorical(probs=torch.tensor([0.3, 0.7])),
        dist.Normal(torch.tensor([-1.0, 1.0]), torch.tensor([0.5, 0.5])),
    )
    # The registration maps the mixture's support to the reals.
    x = torch.tensor([-3.0, 0.0, 2.5])
    torch.testing.assert_close(biject_to(mixture.support)(x), x)
    torch.testing.assert_close(transform_to(mixture.support)(x), x)

    def model():
        pyro.sample("w", mixture)

    guide = AutoDelta(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), Trace_ELBO())
    loss = svi.step()
    assert math.isfinite(loss)
    assert torch.isfinite(guide.median()["w"])
    pyro.clear_param_store()


# --------------------------------------------------------------------------- configuration


PRIOR_CONFIGS = {
    "zero_fixed_pi_zero": dict(n_components=4, zero_component=True, pi_zero=0.9),
    "zero_learned_pi_zero": dict(n_components=4, zero_component=True),
    "zero_two_components": dict(n_components=2, zero_component=True),
    "no_zero": dict(n_components=4, zero_component=False),
    "no_zero_single": dict(n_components=1, zero_component=False),
}


def random_site_values(prior, generator, batch=()):
    """Site values keyed by suffix, each with leading dimensions ``batch`` (as in a particle plate)."""
    options = {"generator": generator, "dtype": F64}
    values = {"precisions": 1 + 10 * torch.rand(*batch, prior.n_components, **options)}
    if prior.n_free_means:
        values["means"] = torch.randn(*batch, prior.n_free_means, **options)
    if prior.n_free_proportions > 1:
        values["pi"] = torch.softmax(torch.randn(*batch, prior.n_free_proportions, **options), -1)
    if prior.learns_pi_zero:
        values["pi_zero"] = 0.5 + 0.4 * torch.rand(batch, **options)
    return values


@pytest.mark.parametrize("config", list(PRIOR_CONFIGS))
def test_assemble_then_split_round_trips_site_values_and_builds_the_stated_mixture(config):
    prior = SoftWeightSharingPrior(**PRIOR_CONFIGS[config])
    like = torch.zeros(1, dtype=F64)
    values = random_site_values(prior, torch.Generator().manual_seed(12))
    mixture = prior.assemble(values, like=like)

    j = prior.n_components
    assert all(t.shape == (j,) for t in mixture)
    torch.testing.assert_close(mixture.proportions.sum(), torch.tensor(1.0, dtype=F64), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(mixture.scales, values["precisions"] ** -0.5, rtol=1e-14, atol=0)
    if prior.zero_component:
        pi_zero = values["pi_zero"] if prior.learns_pi_zero else torch.tensor(prior.pi_zero, dtype=F64)
        assert mixture.means[0] == 0
        torch.testing.assert_close(mixture.proportions[0], pi_zero, rtol=1e-14, atol=0)
        torch.testing.assert_close(mixture.means[1:], values["means"], rtol=0, atol=0)
        if "pi" in values:
            torch.testing.assert_close(mixture.proportions[1:], (1 - pi_zero) * values["pi"], rtol=1e-13, atol=0)
    else:
        torch.testing.assert_close(mixture.means, values["means"], rtol=0, atol=0)
        expected_pi = values.get("pi", torch.ones(1, dtype=F64))
        torch.testing.assert_close(mixture.proportions, expected_pi, rtol=1e-13, atol=0)

    split = prior.split(mixture)
    assert set(split) == set(values)
    for key in values:
        torch.testing.assert_close(split[key], values[key], rtol=1e-12, atol=1e-15)
    again = prior.assemble(split, like=like)
    for a, b in zip(again, mixture):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("config", list(PRIOR_CONFIGS))
def test_assemble_and_split_of_batched_site_values_act_row_by_row(config):
    prior = SoftWeightSharingPrior(**PRIOR_CONFIGS[config])
    like = torch.zeros(1, dtype=F64)
    values = random_site_values(prior, torch.Generator().manual_seed(18), batch=(3, 1))
    mixture = prior.assemble(values, like=like)

    assert all(t.shape == (3, 1, prior.n_components) for t in mixture)
    for s in range(3):
        row = prior.assemble({key: value[s, 0] for key, value in values.items()}, like=like)
        for field, expected in zip(mixture, row):
            torch.testing.assert_close(field[s, 0], expected, rtol=1e-14, atol=0)
    split = prior.split(mixture)
    assert set(split) == set(values)
    for key in values:
        assert split[key].shape == values[key].shape
        torch.testing.assert_close(split[key], values[key], rtol=1e-12, atol=1e-15)


def test_initial_mixture_spaces_learned_means_evenly_over_init_means_with_zero_first():
    prior = SoftWeightSharingPrior(n_components=16, pi_zero=0.99, init_means=(-0.6, 0.6), init_scale=0.25)
    mixture = prior.initial_mixture(torch.randn(100, dtype=F64))
    assert mixture.means.dtype == F64
    assert mixture.means[0] == 0
    expected_means = torch.tensor([-0.6 + 1.2 * k / 14 for k in range(15)], dtype=F64)
    torch.testing.assert_close(mixture.means[1:], expected_means, rtol=0, atol=1e-14)
    torch.testing.assert_close(mixture.scales, torch.full((16,), 0.25, dtype=F64), rtol=0, atol=0)
    expected_weights = torch.tensor([0.99] + [0.01 / 15] * 15, dtype=F64)
    torch.testing.assert_close(mixture.proportions, expected_weights, rtol=1e-12, atol=0)


def test_initial_mixture_without_zero_component_spans_the_weight_range_by_default():
    prior = SoftWeightSharingPrior(n_components=5, zero_component=False, init_scale=0.5)
    weights = torch.tensor([[0.3, -2.0], [1.0, 6.0]], dtype=F64)
    mixture = prior.initial_mixture(weights)
    torch.testing.assert_close(mixture.means, torch.tensor([-2.0, 0.0, 2.0, 4.0, 6.0], dtype=F64), rtol=0, atol=1e-14)
    torch.testing.assert_close(mixture.proportions, torch.full((5,), 0.2, dtype=F64), rtol=1e-14, atol=0)
    torch.testing.assert_close(mixture.scales, torch.full((5,), 0.5, dtype=F64), rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_components=0),
        dict(n_components=-3),
        dict(init_scale=0.0),
        dict(init_scale=-0.1),
        dict(init_scale=float("nan")),
        dict(init_scale=float("inf")),
        dict(n_components=1, pi_zero=0.5),
        dict(pi_zero=0.0),
        dict(pi_zero=1.0),
        dict(pi_zero=1.5),
        dict(pi_zero=-0.2),
        dict(pi_zero=0.5, zero_component=False),
        dict(init_means=(0.5, -0.5)),
    ],
)
def test_invalid_prior_configuration_raises_value_error(kwargs):
    with pytest.raises(ValueError):
        SoftWeightSharingPrior(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(dirichlet=0.0),
        dict(dirichlet=-1.0),
        dict(means_scale=0.0),
        dict(means_scale=-2.0),
        dict(means_scale=float("inf")),
        dict(precision_gamma=(0.0, 1.0)),
        dict(precision_gamma=(1.0, -1.0)),
        dict(precision_gamma=(1.0, 1.0), zero_precision_gamma=(5.0, 0.0)),
        dict(zero_precision_gamma=(5.0, 2.0)),  # needs precision_gamma
        dict(zero_proportion_beta=(0.0, 1.0)),
        dict(zero_proportion_beta=(2.0, -1.0)),
    ],
)
def test_non_positive_hyperprior_values_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        Hyperpriors(**kwargs)


def hand_log_gamma_density(x, a, b):
    return a * math.log(b) - math.lgamma(a) + (a - 1) * torch.log(x) - b * x


def test_log_hyperprior_equals_sum_of_written_out_site_densities():
    hyper = Hyperpriors(
        dirichlet=1.5, means_scale=2.0, precision_gamma=(3.0, 0.5), zero_precision_gamma=(50.0, 2.0),
        zero_proportion_beta=(4.0, 2.0),
    )
    prior = SoftWeightSharingPrior(n_components=4, hyperpriors=hyper)
    values = random_site_values(prior, torch.Generator().manual_seed(13))
    mixture = prior.assemble(values, like=torch.zeros(1, dtype=F64))

    pi, mu, tau, p0 = values["pi"], values["means"], values["precisions"], values["pi_zero"]
    k, alpha = pi.numel(), 1.5
    dirichlet = math.lgamma(k * alpha) - k * math.lgamma(alpha) + ((alpha - 1) * pi.log()).sum()
    normal = (-0.5 * math.log(2 * math.pi * 4.0) - mu**2 / 8.0).sum()
    gamma = hand_log_gamma_density(tau[0], 50.0, 2.0) + hand_log_gamma_density(tau[1:], 3.0, 0.5).sum()
    beta = math.lgamma(6.0) - math.lgamma(4.0) - math.lgamma(2.0) + 3 * torch.log(p0) + torch.log1p(-p0)
    torch.testing.assert_close(prior.log_hyperprior(mixture), dirichlet + normal + gamma + beta, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- EM


def three_cluster_weights(n=600, seed=14):
    g = torch.Generator().manual_seed(seed)
    which = torch.multinomial(torch.tensor([0.5, 0.3, 0.2]), n, replacement=True, generator=g)
    means = torch.tensor([0.0, -0.5, 0.4], dtype=F64)
    scales = torch.tensor([0.02, 0.05, 0.1], dtype=F64)
    return means[which] + scales[which] * torch.randn(n, generator=g, dtype=F64)


def em_objective(prior, weights, mixture, prior_weight):
    """λ Σ_i log p(w_i|θ) (written out) + log p(θ)."""
    log_p = hand_log_density(weights, mixture.proportions, mixture.means, mixture.scales).sum()
    return float(prior_weight * log_p + prior.log_hyperprior(mixture))


FULL_HYPER = dict(dirichlet=2.0, means_scale=1.0, precision_gamma=(2.0, 0.01))
EM_CONFIGS = {
    "flat_no_zero": (dict(n_components=4, zero_component=False), 1.0),
    "gamma_normal_dirichlet": (
        dict(n_components=4, zero_component=False, hyperpriors=Hyperpriors(**FULL_HYPER)),
        0.5,
    ),
    "gamma_normal_dirichlet_with_zero": (
        dict(n_components=5, hyperpriors=Hyperpriors(**FULL_HYPER, zero_precision_gamma=(50.0, 0.02))),
        2.0,
    ),
    "zero_fixed_pi_zero": (dict(n_components=4, pi_zero=0.6), 1.0),
    "zero_beta_pi_zero": (
        dict(n_components=4, hyperpriors=Hyperpriors(zero_proportion_beta=(20.0, 5.0), precision_gamma=(2.0, 0.01))),
        0.3,
    ),
}


@pytest.mark.parametrize("config", list(EM_CONFIGS))
def test_em_update_never_decreases_map_objective(config):
    kwargs, prior_weight = EM_CONFIGS[config]
    prior = SoftWeightSharingPrior(init_scale=0.3, **kwargs)
    weights = three_cluster_weights()
    mixture = prior.initial_mixture(weights)
    objectives = [em_objective(prior, weights, mixture, prior_weight)]
    for _ in range(20):
        mixture = prior.em_update(weights, mixture, prior_weight=prior_weight)
        assert all(torch.isfinite(t).all() for t in mixture)
        if prior.pi_zero is not None:
            torch.testing.assert_close(mixture.proportions[0], torch.tensor(prior.pi_zero, dtype=F64), rtol=1e-12, atol=0)
        if prior.zero_component:
            assert mixture.means[0] == 0
        objectives.append(em_objective(prior, weights, mixture, prior_weight))
    for before, after in zip(objectives, objectives[1:]):
        assert after >= before - 1e-9 * abs(before)
    assert objectives[-1] > objectives[0] + 1.0  # EM did move the mixture


def test_em_update_equals_closed_form_m_step_with_conjugate_hyperpriors():
    a, b, s, alpha, lam = 3.0, 0.2, 0.5, 1.5, 0.7
    prior = SoftWeightSharingPrior(
        n_components=3, zero_component=False,
        hyperpriors=Hyperpriors(dirichlet=alpha, means_scale=s, precision_gamma=(a, b)),
    )
    weights = three_cluster_weights(200, seed=15)
    mixture = GaussianMixture(
        torch.log(torch.tensor([0.2, 0.3, 0.5], dtype=F64)),
        torch.tensor([-0.3, 0.1, 0.5], dtype=F64),
        torch.tensor([0.2, 0.1, 0.3], dtype=F64),
    )
    new = prior.em_update(weights, mixture, prior_weight=lam)

    comp = hand_component_densities(weights, mixture.proportions, mixture.means, mixture.scales)
    gamma = comp / comp.sum(1, keepdim=True)
    counts = lam * gamma.sum(0)
    tau = mixture.scales**-2
    means = tau * lam * (gamma * weights[:, None]).sum(0) / (tau * counts + s**-2)
    scatter = lam * (gamma * (weights[:, None] - means) ** 2).sum(0)
    new_tau = (a - 1 + 0.5 * counts) / (b + 0.5 * scatter)
    pi = (counts + alpha - 1) / (counts + alpha - 1).sum()
    torch.testing.assert_close(new.means, means, rtol=1e-12, atol=0)
    torch.testing.assert_close(new.scales, new_tau**-0.5, rtol=1e-12, atol=0)
    torch.testing.assert_close(new.proportions, pi, rtol=1e-12, atol=0)


def test_em_update_with_zero_component_keeps_mu_zero_and_takes_beta_map_for_pi_zero():
    a0, b0, beta_a, beta_b, alpha, a, b, lam = 40.0, 0.5, 20.0, 5.0, 3.0, 2.0, 0.1, 0.4
    prior = SoftWeightSharingPrior(
        n_components=4,
        hyperpriors=Hyperpriors(dirichlet=alpha, precision_gamma=(a, b), zero_precision_gamma=(a0, b0),
                                zero_proportion_beta=(beta_a, beta_b)),
    )
    weights = three_cluster_weights(300, seed=17)
    mixture = GaussianMixture(
        torch.log(torch.tensor([0.4, 0.2, 0.3, 0.1], dtype=F64)),
        torch.tensor([0.0, -0.4, 0.3, 0.6], dtype=F64),
        torch.tensor([0.05, 0.1, 0.2, 0.1], dtype=F64),
    )
    new = prior.em_update(weights, mixture, prior_weight=lam)

    comp = hand_component_densities(weights, mixture.proportions, mixture.means, mixture.scales)
    gamma = comp / comp.sum(1, keepdim=True)
    counts = lam * gamma.sum(0)
    means = (gamma * weights[:, None]).sum(0) / gamma.sum(0)  # flat prior on the free means
    means[0] = 0.0
    scatter = lam * (gamma * (weights[:, None] - means) ** 2).sum(0)
    shape = torch.tensor([a0, a, a, a], dtype=F64)
    rate = torch.tensor([b0, b, b, b], dtype=F64)
    new_tau = (shape - 1 + 0.5 * counts) / (rate + 0.5 * scatter)
    pi_zero = (counts[0] + beta_a - 1) / (counts.sum() + beta_a + beta_b - 2)
    free = (counts[1:] + alpha - 1) / (counts[1:] + alpha - 1).sum()
    pi = torch.cat([pi_zero.reshape(1), (1 - pi_zero) * free])
    assert new.means[0] == 0
    torch.testing.assert_close(new.means, means, rtol=1e-12, atol=0)
    torch.testing.assert_close(new.scales, new_tau**-0.5, rtol=1e-12, atol=0)
    torch.testing.assert_close(new.proportions, pi, rtol=1e-12, atol=0)


def test_em_recovers_a_well_separated_two_component_mixture():
    g = torch.Generator().manual_seed(16)
    n = 20000
    true_pi, true_mu, true_sigma = [0.3, 0.7], [-1.0, 1.5], [0.2, 0.4]
    second = torch.rand(n, generator=g, dtype=F64) < true_pi[1]
    z = torch.randn(n, generator=g, dtype=F64)
    weights = torch.where(second, true_mu[1] + true_sigma[1] * z, true_mu[0] + true_sigma[0] * z)

    prior = SoftWeightSharingPrior(n_components=2, zero_component=False)
    mixture = GaussianMixture(
        torch.log(torch.tensor([0.5, 0.5], dtype=F64)),
        torch.tensor([-0.5, 0.5], dtype=F64),
        torch.tensor([1.0, 1.0], dtype=F64),
    )
    for _ in range(50):
        mixture = prior.em_update(weights, mixture)
    # Standard errors are ≤ 0.005 for every parameter at this N.
    torch.testing.assert_close(mixture.proportions, torch.tensor(true_pi, dtype=F64), rtol=0, atol=0.02)
    torch.testing.assert_close(mixture.means, torch.tensor(true_mu, dtype=F64), rtol=0, atol=0.02)
    torch.testing.assert_close(mixture.scales, torch.tensor(true_sigma, dtype=F64), rtol=0, atol=0.02)


def test_em_update_of_a_batch_of_mixtures_is_a_value_error():
    prior = SoftWeightSharingPrior(n_components=3, zero_component=False)
    weights = three_cluster_weights(50)
    batch = GaussianMixture(*(t.expand(2, 3) for t in prior.initial_mixture(weights)))
    with pytest.raises(ValueError, match=r"one mixture .* batch shape \(2,\)"):
        prior.em_update(weights, batch)


def test_em_update_keeps_the_dtype_of_float32_weights():
    prior = SoftWeightSharingPrior(n_components=3, zero_component=False)
    weights = three_cluster_weights(100).float()
    mixture = prior.em_update(weights, prior.initial_mixture(weights))
    assert all(t.dtype == torch.float32 for t in mixture)


def test_em_updates_pi_zero_when_one_free_component_shares_the_mixture():
    """With a zero component and one other, π0 is the only mixing parameter (no Dirichlet site)."""
    prior = SoftWeightSharingPrior(n_components=2, hyperpriors=Hyperpriors(dirichlet=0.5))
    g = torch.Generator().manual_seed(9)
    weights = torch.cat([0.01 * torch.randn(900, generator=g, dtype=F64),
                         0.5 + 0.01 * torch.randn(100, generator=g, dtype=F64)])
    start = GaussianMixture(torch.tensor([0.5, 0.5], dtype=F64).log(), torch.tensor([0.0, 0.5], dtype=F64),
                            torch.tensor([0.05, 0.05], dtype=F64))
    updated = prior.em_update(weights, start)
    expected_pi_zero = responsibilities(weights, start)[:, 0].sum() / weights.numel()  # flat Beta
    assert float(updated.proportions[0]) == pytest.approx(float(expected_pi_zero), rel=1e-10)


@pytest.mark.parametrize("weights_dtype, mixture_dtype", [(torch.float32, F64), (F64, torch.float32)])
def test_mixed_weight_and_mixture_dtypes_are_promoted_like_torch(weights_dtype, mixture_dtype, kernel_backend):
    g = torch.Generator().manual_seed(10)
    w = (torch.randn(1, 5000, generator=g, dtype=F64) * 0.3).to(weights_dtype)
    eta, mu, sigma = random_mixture_params(g, 5)
    mixture = GaussianMixture(torch.log_softmax(eta, 0), mu, sigma)
    narrow = GaussianMixture(*(t.to(mixture_dtype) for t in mixture))
    leaves = [w.clone().requires_grad_(), *(t.clone().requires_grad_() for t in narrow)]
    value = mixture_log_prob_sum(leaves[0], GaussianMixture(*leaves[1:]))[0]
    grads = torch.autograd.grad(value, leaves)
    assert value.dtype == F64 and all(g_.dtype == leaf.dtype for g_, leaf in zip(grads, leaves))
    wide = [leaf.detach().double().requires_grad_() for leaf in leaves]
    reference = mixture_log_density(wide[0], GaussianMixture(*wide[1:])).sum()
    reference_grads = torch.autograd.grad(reference, wide)
    # Computed in float32 the sum would be off by ~1e-7 relative, and the float64 gradients by as much.
    torch.testing.assert_close(value, reference, rtol=1e-12, atol=0)
    for grad, expected in zip(grads, reference_grads):
        tolerance = dict(rtol=1e-10, atol=1e-12) if grad.dtype == F64 else dict(rtol=2e-6, atol=1e-5)
        torch.testing.assert_close(grad, expected.to(grad.dtype), **tolerance)


def test_site_hyperpriors_are_built_once_per_dtype_and_device():
    prior = SoftWeightSharingPrior(n_components=3, hyperpriors=Hyperpriors(precision_gamma=(2.0, 1.0)))
    single = prior._site_priors(torch.zeros(1))
    assert prior._site_priors(torch.zeros(5)) is single
    double = prior._site_priors(torch.zeros(1, dtype=F64))
    assert double["precisions"].base_dist.concentration.dtype == F64
    assert single["precisions"].base_dist.concentration.dtype == torch.float32
    with pyro.validation_enabled(not torch.distributions.Distribution._validate_args):
        assert prior._site_priors(torch.zeros(1)) is not single


def test_hyperpriors_first_built_under_inference_mode_still_train():
    prior = SoftWeightSharingPrior(n_components=3, hyperpriors=Hyperpriors(precision_gamma=(2.0, 1.0), dirichlet=2.0))
    with torch.inference_mode():
        prior.log_hyperprior(prior.initial_mixture(torch.randn(10)))
    mixture = GaussianMixture(*(t.clone().requires_grad_() for t in prior.initial_mixture(torch.randn(10))))
    prior.log_hyperprior(mixture).backward()
    assert mixture.scales.grad is not None and torch.isfinite(mixture.scales.grad).all()


def test_mixture_parameters_of_different_lengths_are_a_value_error(kernel_backend):
    mixture = GaussianMixture(torch.log(torch.tensor([0.5, 0.3, 0.2])), torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match=r"shape \(\.\.\., J\), got \(3,\), \(2,\), \(2,\)"):
        mixture_log_prob_sum(torch.randn(1, 100), mixture)
    unbroadcastable = GaussianMixture(torch.zeros(2, 3), torch.zeros(3, 3), torch.ones(3))
    with pytest.raises(ValueError, match=r"batch shapes do not broadcast: \(2, 3\), \(3, 3\), \(3,\)"):
        mixture_log_prob_sum(torch.randn(1, 100), unbroadcastable)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0)])
def test_empty_batches_and_empty_weight_rows_give_empty_and_zero_sums(shape, kernel_backend):
    weights = torch.zeros(shape, dtype=F64, requires_grad=True)
    sums = mixture_log_prob_sum(weights, small_mixture())
    assert sums.shape == shape[:1]
    torch.testing.assert_close(sums, torch.zeros(shape[:1], dtype=F64))
    sums.sum().backward()
    assert weights.grad.shape == shape
    with torch.no_grad():
        torch.testing.assert_close(mixture_log_prob_sum(weights, small_mixture()), torch.zeros(shape[:1], dtype=F64))


def test_weights_and_mixtures_whose_batches_do_not_broadcast_are_a_value_error():
    mixture = GaussianMixture(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="do not broadcast"):
        mixture_log_prob_sum(torch.zeros(3, 5), mixture)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_group_log_joint_of_strided_coordinates_equals_that_of_contiguous_ones(backend):
    # the native kernel reads the mixture's fields flat: a strided view of the means must not reach it as is
    from bayes_sws.kernels import use_backend

    prior = SoftWeightSharingPrior(n_components=3, zero_component=False)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 10, generator=g, dtype=torch.float64, requires_grad=True)
    stored = torch.tensor([-0.5, 9.0, 0.0, 9.0, 0.5, 9.0], dtype=torch.float64, requires_grad=True)
    rest = {"precisions": torch.zeros(3, dtype=torch.float64, requires_grad=True),
            "pi": torch.zeros(3, dtype=torch.float64, requires_grad=True)}
    means = stored.detach()[::2].clone().requires_grad_()
    with use_backend(backend):
        strided = prior.group_log_joint([w], {"means": stored[::2], **rest})
        contiguous = prior.group_log_joint([w], {"means": means, **rest})
        expected = torch.autograd.grad(contiguous, [w, means])
        got = torch.autograd.grad(strided, [w, stored])
    torch.testing.assert_close(strided, contiguous, rtol=1e-12, atol=0)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got[1][::2], expected[1], rtol=1e-12, atol=1e-14)
