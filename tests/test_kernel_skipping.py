"""The native kernel's component skipping: value and gradients equal the dense kernel's to round-off."""

from __future__ import annotations

import math

import pytest
import torch

from bayes_sws import kernels
from bayes_sws.prior import GaussianMixture, mixture_log_density, mixture_log_prob_sum, responsibilities

pytestmark = pytest.mark.skipif(not kernels.native_available(), reason="no C compiler here")

F64 = torch.float64
J = 17


def _ullrich_late(generator) -> GaussianMixture:
    """Late in training: π0 = 0.999 at a narrow zero component, 16 narrow components of 0.01-0.05."""
    means = torch.cat([torch.zeros(1), torch.linspace(-0.6, -0.05, 8), torch.linspace(0.05, 0.6, 8)])
    scales = torch.cat([torch.tensor([0.005]), 0.01 + 0.04 * torch.rand(J - 1, generator=generator)])
    proportions = torch.cat([torch.tensor([0.999]), torch.full((J - 1,), 0.001 / (J - 1))])
    return GaussianMixture(proportions.log(), means, scales)


def _broad_early(generator) -> GaussianMixture:
    """Early in training: equal proportions, broad components over the weights' range."""
    return GaussianMixture(torch.full((J,), -math.log(J)), torch.linspace(-0.3, 0.3, J),
                           0.05 + 0.1 * torch.rand(J, generator=generator))


def _draw(mixture: GaussianMixture, n: int, generator) -> torch.Tensor:
    """n weights drawn from the mixture, in random order (as the weights of a layer are)."""
    component = torch.multinomial(mixture.log_proportions.exp(), n, replacement=True, generator=generator)
    return mixture.means[component] + mixture.scales[component] * torch.randn(n, generator=generator)


def _results(weights, mixture, *, dense: bool, dtype):
    """The value and its gradients with respect to the weights and each mixture field, as float64."""
    leaves = [t.to(dtype).clone().requires_grad_() for t in (weights, *mixture)]
    with kernels.use_backend("native"), kernels.use_skipping(not dense):
        value = mixture_log_prob_sum(leaves[0], GaussianMixture(*leaves[1:]), event_dim=1)
        grads = torch.autograd.grad(value, leaves)
        with torch.no_grad():
            value_only = mixture_log_prob_sum(leaves[0].detach(), GaussianMixture(*leaves[1:]).detach())
    torch.testing.assert_close(value_only, value.detach(), rtol=0, atol=0, equal_nan=True)
    return [value.detach().double(), *(g.double() for g in grads)]


def _reference(weights, mixture):
    leaves = [t.double().clone().requires_grad_() for t in (weights, *mixture)]
    value = mixture_log_density(leaves[0], GaussianMixture(*leaves[1:])).sum()
    return [value.detach(), *torch.autograd.grad(value, leaves)]


def _relative_errors(results, reference):
    """max |x − ref| / max |ref| per output (value, ∂w, ∂log π, ∂μ, ∂σ)."""
    return [float((x - r).abs().max() / r.abs().max().clamp_min(1e-300)) for x, r in zip(results, reference)]


def _cases():
    g = torch.Generator().manual_seed(51)
    late = _ullrich_late(g)
    early = _broad_early(g)
    far = GaussianMixture(torch.cat([late.log_proportions[:-1], torch.tensor([math.log(1e-4)])]),
                          torch.cat([late.means[:-1], torch.tensor([5.0])]),
                          torch.cat([late.scales[:-1], torch.tensor([0.01])]))
    near_one = GaussianMixture(torch.cat([torch.tensor([math.log1p(-1e-7)]), torch.full((J - 1,), math.log(1e-7 / 16))]),
                               late.means, late.scales)
    near_zero = GaussianMixture(late.log_proportions.clone(), late.means, late.scales)
    near_zero.log_proportions[3] = math.log(1e-30)
    near_zero.log_proportions[5] = -math.inf
    # a broad component of π = e^-150 has the floor of every block, and the narrow one
    # rises up to 155 nats above it: beyond what float32 exp can take against the floor
    faded = GaussianMixture(torch.tensor([0.0, -150.0]), torch.zeros(2), torch.tensor([0.01, 1.0]))
    return {
        "late_training": (late, _draw(late, 40_000, g)),
        "a_faded_broad_component_under_a_narrow_one": (faded, 0.4 * torch.rand(40_000, generator=g) - 0.2),
        "early_training": (early, 0.15 * torch.randn(40_000, generator=g)),
        "a_component_no_weight_is_near": (far, _draw(late, 40_000, g)),
        "pi_zero_near_one": (near_one, _draw(late, 40_000, g)),
        "pi_near_zero_and_zero": (near_zero, _draw(late, 40_000, g)),
    }


CASES = _cases()


@pytest.mark.parametrize("case", list(CASES))
def test_float32_skipping_is_as_close_to_the_float64_reference_as_the_dense_kernel(case):
    mixture, weights = CASES[case]
    reference = _reference(weights, mixture)
    dense = _relative_errors(_results(weights, mixture, dense=True, dtype=torch.float32), reference)
    skipping = _relative_errors(_results(weights, mixture, dense=False, dtype=torch.float32), reference)
    for name, skip_error, dense_error in zip(("value", "w", "log pi", "mu", "sigma"), skipping, dense):
        assert skip_error <= 2 * dense_error + 1e-7, (name, skip_error, dense_error)


def _sigma_gradient_terms(weights, mixture) -> torch.Tensor:
    """(p_j Σ_i γ_ij d_ij² + Σ_i γ_ij) / σ_j: the two sums whose difference is ∂/∂σ_j, added.

    A narrow zero component's gradient is a difference of two sums about a thousand times
    larger than it: round-off scales with the sums, not with the difference.
    """
    weights, mixture = weights.double(), GaussianMixture(*(t.double() for t in mixture))
    gamma = responsibilities(weights, mixture)
    d = weights.unsqueeze(-1) - mixture.means
    return (mixture.precisions * (gamma * d * d).sum(0) + gamma.sum(0)) / mixture.scales


@pytest.mark.parametrize("case", ["late_training", "early_training", "pi_near_zero_and_zero"])
def test_float64_skipping_equals_the_dense_kernel_to_float64_round_off(case):
    mixture, weights = CASES[case]
    dense = _results(weights, mixture, dense=True, dtype=F64)
    skipping = _results(weights, mixture, dense=False, dtype=F64)
    scales = [full.abs().max() for full in dense[:-1]] + [_sigma_gradient_terms(weights, mixture).max()]
    for skip, full, scale in zip(skipping, dense, scales):
        assert float((skip - full).abs().max()) <= 1e-12 * float(scale)


def test_skipping_is_on_by_default_and_its_margin_decides_the_result(monkeypatch):
    # With a margin of 2 nats instead of ln(1/u) + ln J + 5, skipped terms show: the
    # default path skips, and the margin is what keeps it exact.
    mixture, weights = CASES["late_training"]
    dense = _results(weights, mixture, dense=True, dtype=torch.float32)
    unit_round_off = torch.finfo(torch.float32).eps / 2
    monkeypatch.setattr(kernels, "_SKIP_SAFETY", 2.0 + math.log(unit_round_off) - math.log(J))
    assert kernels.skip_margin(torch.float32, J) == pytest.approx(2.0)
    leaves = [t.clone().requires_grad_() for t in (weights, *mixture)]
    with kernels.use_backend("native"):
        value = mixture_log_prob_sum(leaves[0], GaussianMixture(*leaves[1:]))
        grads = torch.autograd.grad(value, leaves)
    errors = _relative_errors([value.detach().double(), *(g.double() for g in grads)], dense)
    assert max(errors) > 1e-4


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("index", [12_288, 12_345, 12_543])  # first, inside and last of a block
def test_a_non_finite_weight_poisons_as_in_the_dense_kernel_while_other_blocks_skip(bad, index):
    mixture, weights = CASES["late_training"]
    weights = weights.clone()
    weights[index] = bad
    value, grad_w, *mixture_grads = _results(weights, mixture, dense=False, dtype=torch.float32)
    _, dense_grad_w, *_ = _results(weights, mixture, dense=True, dtype=torch.float32)
    assert value.isnan() and all(g.isnan().all() for g in mixture_grads)
    assert grad_w.isnan().nonzero().flatten().tolist() == [index]
    finite = grad_w.isfinite()
    scale = float(dense_grad_w[finite].abs().max())
    assert float((grad_w[finite] - dense_grad_w[finite]).abs().max()) <= 1e-6 * scale


def test_skip_margin_is_the_unit_round_off_in_nats_plus_log_j_plus_the_safety():
    assert kernels.skip_margin(torch.float32, 17) == pytest.approx(24 * math.log(2) + math.log(17) + 5)
    assert kernels.skip_margin(F64, 17) == pytest.approx(53 * math.log(2) + math.log(17) + 5)


def _short_map_run(*, dense: bool, steps: int = 60):
    """Adam on weights and mixture: a data term pulling the weights to targets, minus the prior."""
    g = torch.Generator().manual_seed(52)
    start = _ullrich_late(g)
    targets = _draw(start, 10_000, g) + 0.002 * torch.randn(10_000, generator=g)
    weights = targets.clone().requires_grad_()
    logits, means = start.log_proportions.clone().requires_grad_(), start.means.clone().requires_grad_()
    log_scales = start.scales.log().clone().requires_grad_()
    optimizer = torch.optim.Adam([weights, logits, means, log_scales], lr=1e-3)
    losses = []
    with kernels.use_backend("native"), kernels.use_skipping(not dense):
        for _ in range(steps):
            optimizer.zero_grad()
            mixture = GaussianMixture(torch.log_softmax(logits, 0), means, log_scales.exp())
            loss = 50.0 * (weights - targets).pow(2).sum() - mixture_log_prob_sum(weights, mixture)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    return losses, GaussianMixture(torch.log_softmax(logits, 0), means, log_scales.exp()).detach()


def test_a_short_map_run_ends_at_the_dense_kernels_loss_and_mixture():
    dense_losses, dense_mixture = _short_map_run(dense=True)
    losses, mixture = _short_map_run(dense=False)
    assert dense_losses[-1] < dense_losses[0] - 1.0  # it trains
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(dense_losses), rtol=1e-5, atol=0)
    for field, dense_field in zip(mixture, dense_mixture):
        torch.testing.assert_close(field, dense_field, rtol=1e-5, atol=1e-7)


def _narrow_just_past_a_broad_component(dtype):
    """Weights under a broad component (σ = 1) and a narrow one (σ = 1e-4, or 1e-7 in float64) a few of its σ
    past the largest weight: each of its responsibilities lies below e^(−margin), yet its gradient terms
    γ·|d|/σ² and γ·(d²/σ² − 1)/σ carry σ_broad/σ_narrow·(d/σ)² ≈ 10⁴·70 (10⁷·120) more."""
    g = torch.Generator().manual_seed(53)
    weights = 0.01 * torch.randn(4096, generator=g, dtype=F64)
    narrow, distance = (1e-4, 8.5) if dtype == torch.float32 else (1e-7, 11.0)
    mixture = GaussianMixture(torch.full((2,), math.log(0.5), dtype=F64),
                              torch.tensor([0.0, float(weights.max()) + distance * narrow], dtype=F64),
                              torch.tensor([1.0, narrow], dtype=F64))
    return mixture, weights


def test_a_narrow_component_just_past_the_weights_still_counts_in_float32_gradients():
    mixture, weights = _narrow_just_past_a_broad_component(torch.float32)
    reference = _reference(weights, mixture)
    dense = _relative_errors(_results(weights, mixture, dense=True, dtype=torch.float32), reference)
    skipping = _relative_errors(_results(weights, mixture, dense=False, dtype=torch.float32), reference)
    for name, skip_error, dense_error in zip(("value", "w", "log pi", "mu", "sigma"), skipping, dense):
        assert skip_error <= 2 * dense_error + 1e-7, (name, skip_error, dense_error)


def test_a_narrow_component_just_past_the_weights_still_counts_in_float64_gradients():
    mixture, weights = _narrow_just_past_a_broad_component(F64)
    dense = _results(weights, mixture, dense=True, dtype=F64)
    skipping = _results(weights, mixture, dense=False, dtype=F64)
    for name, skip, full in zip(("value", "w", "log pi", "mu", "sigma"), skipping, dense):
        assert float((skip - full).abs().max()) <= 1e-12 * float(full.abs().max()), name


def _components_at_the_margin(generator, components: int, dtype) -> tuple[GaussianMixture, torch.Tensor]:
    """Weights under a broad component at 0; every other component, of σ down to 1e-7, placed past the weights'
    range so that its log-density gap there is the skipping margin plus −3 to 12 nats."""
    broad = float(torch.empty(1, dtype=F64).uniform_(math.log(1e-3), math.log(10), generator=generator).exp())
    weights = broad * float(torch.rand(1, generator=generator)) * torch.randn(
        int(torch.randint(1, 2000, (1,), generator=generator)), generator=generator, dtype=F64)
    scales = torch.empty(components, dtype=F64).uniform_(math.log(1e-7), math.log(broad), generator=generator).exp()
    scales[0] = broad
    log_proportions = torch.log_softmax(3 * torch.randn(components, generator=generator, dtype=F64), 0)
    log_norm = log_proportions - scales.log() - 0.5 * math.log(2 * math.pi)
    lo, hi = float(weights.min()), float(weights.max())
    top_at_hi = float(log_norm[0]) - 0.5 * (hi / broad) ** 2
    gaps = kernels.skip_margin(dtype, components) + torch.empty(components, dtype=F64).uniform_(-3, 12,
                                                                                                generator=generator)
    distances = (2 * (log_norm - top_at_hi + gaps)).clamp_min(0).sqrt() * scales
    sides = torch.arange(components) % 2 == 1
    means = torch.where(sides, hi + distances, lo - distances)
    means[0] = 0.0
    return GaussianMixture(log_proportions, means, scales), weights


@pytest.mark.parametrize("components", [2, 17, 64])
def test_float64_skipping_of_components_at_the_margin_is_as_exact_as_the_dense_kernel(components):
    # (float64: float32's round-off under the cancellation in ∂μ and ∂σ would hide what skipping drops)
    g = torch.Generator().manual_seed(54 + components)
    for _ in range(20):
        mixture, weights = _components_at_the_margin(g, components, F64)
        reference = _reference(weights, mixture)
        dense = _relative_errors(_results(weights, mixture, dense=True, dtype=F64), reference)
        skipping = _relative_errors(_results(weights, mixture, dense=False, dtype=F64), reference)
        for name, skip_error, dense_error in zip(("value", "w", "log pi", "mu", "sigma"), skipping, dense):
            assert skip_error <= 2 * dense_error + 1e-13, (name, skip_error, dense_error)


def test_float32_block_reference_stays_finite_where_the_log_densities_are_huge():
    # 256 equal weights 1e4-1e6 sigma past four narrow components whose log-densities
    # there, -1e8 to -1e12, differ by under 60 nats: the bounds pass the block-reference
    # guard, but float32 round-off of each log-density is up to thousands of nats, far
    # past the [-126, 127] (in bits) that exp2_f32 takes
    for scale in torch.logspace(-6.5, -4, 11).tolist():
        p, w0 = scale**-2, 1.2
        mixture = GaussianMixture(torch.tensor([0.1, 0.2, 0.3, 0.4]).log(),
                                  60 / (p * w0) * torch.tensor([0.0, 0.3, 0.6, 0.9]), torch.full((4,), scale))
        weights = torch.full((256,), w0)
        skipping = _results(weights, mixture, dense=False, dtype=torch.float32)
        dense = _results(weights, mixture, dense=True, dtype=torch.float32)
        assert all(bool(torch.isfinite(x).all()) for x in skipping), scale
        torch.testing.assert_close(skipping[0], dense[0], rtol=1e-6, atol=0)


def test_float32_skipping_keeps_a_component_for_equal_weights_far_past_narrow_ones():
    # at log-densities near -8e8 round-off put every component's bound under the
    # threshold: the block kept none and the value was -inf (the dense kernel's is finite)
    mixture = GaussianMixture(torch.tensor([-1.5796948671340942, -4.066702365875244, -0.6928619742393494, -1.2848732471466064]),
                              torch.tensor([9.298034342464234e-09, 5.068531550023181e-08, 1.0655427651329319e-08,
                                            2.9901923159769694e-09]), torch.full((4,), 6.368058631858488e-05))
    weights = torch.full((256,), 2.507568836212158)
    skipping = _results(weights, mixture, dense=False, dtype=torch.float32)
    dense = _results(weights, mixture, dense=True, dtype=torch.float32)
    torch.testing.assert_close(skipping[0], dense[0], rtol=1e-6, atol=0)
