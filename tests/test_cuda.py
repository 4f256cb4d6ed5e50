"""The same code paths on a CUDA device (skipped where there is none)."""

from __future__ import annotations

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


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_fused_prior_on_cuda_matches_the_cpu_float64_reference(dtype, tolerance) -> None:
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(2, 300_001, generator=generator, dtype=torch.float64) * 0.3
    inputs = (torch.randn(17, generator=generator, dtype=torch.float64),
              torch.randn(17, generator=generator, dtype=torch.float64) * 0.5,
              torch.logspace(-3, 0.5, 17, dtype=torch.float64))
    reference = _value_and_grads(lambda w, m: sws.mixture_log_density(w, m).sum(-1), weights, inputs)
    on_cuda = _value_and_grads(
        lambda w, m: sws.mixture_log_prob_sum(w, m, chunk_size=1 << 16),
        weights.to("cuda", dtype), tuple(t.to("cuda", dtype) for t in inputs))
    for expected, actual in zip((reference[0], *reference[1]), (on_cuda[0], *on_cuda[1])):
        assert actual.is_cuda
        scale = expected.abs().max()
        assert float((actual.double().cpu() - expected).abs().max() / scale) < tolerance


def test_compiled_kernels_on_cuda_match_eager() -> None:
    generator = torch.Generator().manual_seed(1)
    weights = (torch.randn(3, 100_003, generator=generator) * 0.2).cuda()
    inputs = (torch.randn(17, generator=generator).cuda(), torch.linspace(-0.6, 0.6, 17).cuda(),
              torch.full((17,), 0.05).cuda())
    eager = _value_and_grads(sws.mixture_log_prob_sum, weights, inputs)
    sws.use_compiled_kernels(True)
    try:
        compiled = _value_and_grads(sws.mixture_log_prob_sum, weights, inputs)
    finally:
        sws.use_compiled_kernels(False)
    for expected, actual in zip((eager[0], *eager[1]), (compiled[0], *compiled[1])):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-3)


def test_map_fit_runs_on_cuda_and_keeps_every_value_there() -> None:
    data = sws.load_dataset("digits").to("cuda")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).cuda()
    model = sws.SoftWeightSharingModel(net, prior=sws.SoftWeightSharingPrior(n_components=5, init_scale=0.1),
                                       likelihood=sws.Categorical(), prior_weight=0.1)
    result = sws.fit_map(model, data, epochs=3, batch_size=64, em_every=10, progress=False,
                         learning_rates=sws.LearningRates(weights=3e-3, means=1e-3, precisions=3e-2, pi=3e-2))
    assert all(value.is_cuda for value in result.values.values())
    assert result.history[-1]["accuracy"] > 0.8
