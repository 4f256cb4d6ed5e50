"""The same code paths on a CUDA device (skipped where there is none)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import bayes_sws as sws

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _value_and_grads(log_prob, weights, mixture_inputs):
    weights = weights.clone().requires_grad_()
    logits, means, scales = (t.clone().requires_grad_() for t in mixture_inputs)
    mixture = sws.GaussianMixture(torch.log_softmax(logits, 0), means, scales)
    value = log_prob(weights, mixture)
    grads = torch.autograd.grad(value.sum(), [weights, logits, means, scales])
    return value.detach(), grads


def _cases():
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(2, 300_001, generator=generator, dtype=torch.float64) * 0.3
    inputs = (torch.randn(17, generator=generator, dtype=torch.float64),
              torch.randn(17, generator=generator, dtype=torch.float64) * 0.5,
              torch.logspace(-3, 0.5, 17, dtype=torch.float64))
    return weights, inputs


def _relative_errors(results, reference) -> list[float]:
    """max |x − x_ref| / max |x_ref| for the value and each gradient."""
    return [float((actual.double().cpu() - expected).abs().max() / expected.abs().max())
            for expected, actual in zip((reference[0], *reference[1]), (results[0], *results[1]))]


def _reference_sum(weights, mixture):
    return sws.mixture_log_density(weights, mixture).sum(-1)


def _fused_sum(weights, mixture):
    return sws.mixture_log_prob_sum(weights, mixture, chunk_size=1 << 16)


def test_fused_prior_on_cuda_in_float64_matches_the_cpu_reference_to_1e_10() -> None:
    weights, inputs = _cases()
    reference = _value_and_grads(_reference_sum, weights, inputs)
    on_cuda = _value_and_grads(_fused_sum, weights.cuda(), tuple(t.cuda() for t in inputs))
    assert all(g.is_cuda for g in on_cuda[1])
    assert max(_relative_errors(on_cuda, reference)) < 1e-10


def test_fused_prior_on_cuda_in_float32_is_as_accurate_as_float32_autograd() -> None:
    """Float32 round-off: the fused error is within a small factor of the autograd reference's own."""
    weights, inputs = _cases()
    exact = _value_and_grads(_reference_sum, weights, inputs)
    as_float32 = (weights.float().cuda(), tuple(t.float().cuda() for t in inputs))
    fused = _relative_errors(_value_and_grads(_fused_sum, *as_float32), exact)
    autograd = _relative_errors(_value_and_grads(_reference_sum, *as_float32), exact)
    for fused_error, autograd_error in zip(fused, autograd):
        assert fused_error <= 10 * autograd_error + 1e-6


def test_compiled_kernels_on_cuda_match_eager() -> None:
    generator = torch.Generator().manual_seed(1)
    weights = (torch.randn(3, 100_003, generator=generator) * 0.2).cuda()
    inputs = (torch.randn(17, generator=generator).cuda(), torch.linspace(-0.6, 0.6, 17).cuda(),
              torch.full((17,), 0.05).cuda())
    eager = _value_and_grads(sws.mixture_log_prob_sum, weights, inputs)
    with sws.use_backend("compile"):
        compiled = _value_and_grads(sws.mixture_log_prob_sum, weights, inputs)
    for expected, actual in zip((eager[0], *eager[1]), (compiled[0], *compiled[1])):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-3)


def _digits_on_cuda() -> tuple[sws.Dataset, sws.SoftWeightSharingModel]:
    """The digits data and a 64-32-10 model under a 5-component prior, both on CUDA."""
    data = sws.load_dataset("digits").to("cuda")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).cuda()
    model = sws.SoftWeightSharingModel(net, prior=sws.SoftWeightSharingPrior(n_components=5, init_scale=0.1),
                                       likelihood=sws.Categorical(), prior_weight=0.1)
    return data, model


def test_map_fit_runs_on_cuda_and_keeps_every_value_there() -> None:
    data, model = _digits_on_cuda()
    result = sws.fit_map(model, data, epochs=3, batch_size=64, em_every=10, progress=False,
                         learning_rates=sws.LearningRates(weights=3e-3, means=1e-3, precisions=3e-2, pi=3e-2))
    assert all(value.is_cuda for value in result.values.values())
    assert result.history[-1]["accuracy"] > 0.8


def _lean_and_trace_elbo(device: str, *, local: bool) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """vi_loss's and Trace_ELBO's value and guide gradients on ``device``, the same draws (S = 2, float64)."""
    from pyro.infer import Trace_ELBO

    from bayes_sws.fitting import library_scope
    from bayes_sws.local_reparam import weight_posterior

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).double().to(device)
    model = sws.SoftWeightSharingModel(net, prior=sws.SoftWeightSharingPrior(n_components=4, init_means=(-0.5, 0.5)),
                                       likelihood=sws.Categorical(), prior_weight=0.25)
    x = torch.randn(32, 64, dtype=torch.float64, device=device)
    y = torch.randint(0, 10, (32,), device=device)
    results = []
    with library_scope():
        guide = sws.vi_guide(model, init_scale=0.1)
        guide(x, y, data_size=500)
        posterior = {name: guide[0]._get_loc_and_scale(name) for name in model.prior_sites}
        elbo = Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1)
        for loss, under in ((sws.vi_loss(num_particles=2, local_reparameterization=local), None),
                            (elbo.differentiable_loss, posterior if local else None)):
            with torch.random.fork_rng(devices=[torch.device(device)] if device == "cuda" else []):
                torch.manual_seed(3)
                if device == "cuda":
                    torch.cuda.manual_seed(3)
                with weight_posterior(under) if under else contextlib.nullcontext():
                    value = loss(model, guide, x, y, data_size=500)
            results.append((value.detach(), list(torch.autograd.grad(value, list(guide.parameters())))))
    return results


@pytest.mark.parametrize("local", [False, True], ids=["weights", "local"])
def test_the_lean_vi_loss_on_cuda_equals_trace_elbos_in_value_and_gradients(local) -> None:
    (lean, lean_grads), (reference, reference_grads) = _lean_and_trace_elbo("cuda", local=local)
    assert lean.is_cuda and all(g.is_cuda for g in lean_grads)
    torch.testing.assert_close(lean, reference, rtol=1e-12, atol=0)
    for mine, theirs in zip(lean_grads, reference_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12 * float(theirs.abs().max()))


def test_a_vi_fit_runs_on_cuda_and_keeps_every_value_there() -> None:
    data, model = _digits_on_cuda()
    state = sws.fit_vi(model, data, epochs=3, batch_size=64, num_particles=2, local_reparameterization=True,
                       learning_rates=sws.LearningRates(weights=3e-3, means=1e-3, precisions=3e-2, pi=3e-2),
                       progress=False)
    assert all(value.is_cuda for value in state.values.values())
    assert all(p.is_cuda for p in state.guide.parameters())
    assert state.history[-1]["test_accuracy"] > 0.8  # 0.87 on the CPU
