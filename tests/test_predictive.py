"""The posterior predictive: analytic cases, and the vectorised pass against one network per draw."""

import math

import pytest
import torch
from torch import nn

from bayes_sws import Categorical, Gaussian, SoftWeightSharingModel, SoftWeightSharingPrior
from bayes_sws.predictive import classification_predictive, predict, regression_predictive


def test_identical_draws_carry_no_epistemic_uncertainty():
    probabilities = torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.3, 0.4]])
    result = classification_predictive(probabilities.log().expand(5, 2, 3))
    entropy = -(probabilities * probabilities.log()).sum(-1)
    assert torch.allclose(result.probabilities, probabilities)
    assert torch.allclose(result.entropy, entropy)
    assert torch.allclose(result.expected_entropy, entropy)
    assert torch.allclose(result.mutual_information, torch.zeros(2), atol=1e-6)


def test_two_confident_draws_that_disagree_are_all_epistemic():
    one_hot = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # (S=2, B=1, C=2)
    result = classification_predictive(one_hot.log(), torch.tensor([0]))
    assert result.probabilities.tolist() == [[0.5, 0.5]]
    assert result.entropy.item() == pytest.approx(math.log(2))
    assert result.expected_entropy.item() == 0.0
    assert result.mutual_information.item() == pytest.approx(math.log(2))
    assert result.log_likelihood[:, 0].tolist() == [0.0, -math.inf]


def test_regression_variance_is_the_variance_of_means_plus_the_noise():
    means = torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0]])  # (S=3, B=2)
    noise = torch.tensor([0.1, 0.2, 0.3])
    result = regression_predictive(means, noise, torch.tensor([1.0, 1.0]))
    assert result.mean.tolist() == pytest.approx([2.0, 1.0])
    assert result.epistemic_variance.tolist() == pytest.approx([8 / 3, 0.0])
    assert result.variance.tolist() == pytest.approx([8 / 3 + 0.14 / 3, 0.14 / 3])
    expected = torch.distributions.Normal(means, noise[:, None]).log_prob(torch.ones(3, 2))
    assert torch.allclose(result.log_likelihood, expected)


def _model(likelihood, n_outputs: int) -> SoftWeightSharingModel:
    torch.manual_seed(0)
    network = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, n_outputs))
    return SoftWeightSharingModel(network, prior=SoftWeightSharingPrior(n_components=3),
                                  likelihood=likelihood, prior_weight=1.0)


def _draws(model: SoftWeightSharingModel, n_draws: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    values = model.initial_values()
    return {name: value + 0.3 * torch.randn((n_draws, *value.shape), generator=generator)
            for name, value in values.items() if name in model.prior_sites}


def _one_network_per_draw(model, draws, x):
    n_draws = next(iter(draws.values())).shape[0]
    return torch.stack([torch.func.functional_call(model.network, {k: v[s] for k, v in draws.items()}, (x,))
                        for s in range(n_draws)])


def test_classification_predictive_equals_a_loop_over_draws_in_any_chunking():
    model = _model(Categorical(), 3)
    draws = _draws(model, 7)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    per_draw = _one_network_per_draw(model, draws, x).softmax(-1)
    whole = predict(model, draws, x, y)
    chunked = predict(model, draws, x, y, chunk_size=3)
    for result in (whole, chunked):
        assert torch.allclose(result.probabilities, per_draw.mean(0), atol=1e-6)
        assert torch.allclose(result.log_likelihood, per_draw.log().gather(-1, y.expand(7, 10)[..., None])[..., 0],
                              atol=1e-5)
    assert torch.allclose(whole.mutual_information, chunked.mutual_information, atol=1e-6)
    assert whole.replicates is None


def test_a_single_draw_is_the_network_at_that_point():
    model = _model(Categorical(), 3)
    draws = _draws(model, 1)
    x = torch.randn(5, 4)
    result = predict(model, draws, x)
    assert torch.allclose(result.probabilities, _one_network_per_draw(model, draws, x)[0].softmax(-1), atol=1e-6)
    assert torch.allclose(result.mutual_information, torch.zeros(5))


def test_replicates_are_seeded_draws_of_the_targets():
    model = _model(Categorical(), 3)
    draws = _draws(model, 4)
    x = torch.randn(6, 4)
    first, again = predict(model, draws, x, seed=3), predict(model, draws, x, seed=3, chunk_size=2)
    assert first.replicates.shape == (4, 6) and first.replicates.dtype == torch.int64
    assert torch.equal(first.replicates, predict(model, draws, x, seed=3).replicates)
    assert set(first.replicates.unique().tolist()) <= {0, 1, 2}
    assert again.replicates.shape == (4, 6)


@pytest.mark.parametrize("learned", [False, True])
def test_regression_predictive_uses_each_draws_noise_scale(learned):
    model = _model(Gaussian(noise_scale=None if learned else 0.5), 1)
    draws = _draws(model, 5)
    if learned:
        draws["noise_scale"] = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    x, y = torch.randn(8, 4), torch.randn(8)
    outputs = _one_network_per_draw(model, draws, x)[..., 0]
    result = predict(model, draws, x, y, chunk_size=3)
    noise_variance = (draws["noise_scale"] ** 2).mean() if learned else 0.25
    assert torch.allclose(result.mean, outputs.mean(0), atol=1e-6)
    assert torch.allclose(result.variance, outputs.var(0, correction=0) + noise_variance, atol=1e-6)
    scales = draws["noise_scale"][:, None] if learned else 0.5
    assert torch.allclose(result.log_likelihood, torch.distributions.Normal(outputs, scales).log_prob(y), atol=1e-5)


def test_a_learned_noise_scale_must_be_among_the_draws():
    model = _model(Gaussian(), 1)
    with pytest.raises(ValueError, match="noise_scale"):
        predict(model, _draws(model, 2), torch.randn(3, 4))


def test_nan_inputs_are_a_one_line_error():
    model = _model(Categorical(), 3)
    x = torch.randn(5, 4)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN") as error:
        predict(model, _draws(model, 2), x)
    assert "\n" not in str(error.value)
