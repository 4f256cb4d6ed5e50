"""Tests of bayes_sws.inference: MAP fitting through the fit loop, EM updates."""

import math

import pyro
import pytest
import torch
from pyro import poutine
from torch import nn

from bayes_sws.data import Dataset
from bayes_sws.fitting import FitState, evaluate
from bayes_sws.inference import EMUpdate, fit_map
from bayes_sws.optim import LearningRates
from bayes_sws.model import Categorical, Gaussian, SoftWeightSharingModel
from bayes_sws.prior import Hyperpriors, SoftWeightSharingPrior

F64 = torch.float64


@pytest.fixture(autouse=True)
def _fresh_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def toy_dataset(n_train=60, n_test=30, seed=0):
    """Three Gaussian blobs in 4 dimensions: a small classification problem."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0]])

    def split(n):
        y = torch.randint(0, 3, (n,), generator=g)
        return centres[y] + torch.randn(n, 4, generator=g), y

    train_x, train_y = split(n_train)
    test_x, test_y = split(n_test)
    return Dataset(name="toy", task="classification", train_x=train_x, train_y=train_y,
                   test_x=test_x, test_y=test_y, n_classes=3)


def toy_model(prior=None, seed=1, prior_weight=1e-2):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    prior = prior or SoftWeightSharingPrior(n_components=4, init_means=(-0.5, 0.5))
    return SoftWeightSharingModel(net, prior=prior, likelihood=Categorical(), prior_weight=prior_weight)


def joint_loss(model, values, x, y):
    """−log p(y, w, θ) at fixed site values (pass-through parameters from the param store):
    the MAP objective, independent of any guide."""
    with torch.no_grad():
        trace = poutine.trace(poutine.condition(model, data=values)).get_trace(x, y)
        return -trace.log_prob_sum().item()


FAST_RATES = LearningRates(weights=0.05, means=0.01, precisions=0.01, pi=0.01)


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs", "cg"])
def test_fit_map_decreases_the_map_objective_and_records_history(optimizer):
    data = toy_dataset()
    model = toy_model()
    initial = model.initial_values()
    before = joint_loss(model, initial, data.train_x, data.train_y)

    result = fit_map(model, data, epochs=3, batch_size=20, optimizer=optimizer, learning_rates=FAST_RATES,
                     iterations_per_epoch=10, progress=False)

    assert isinstance(result, FitState)
    after = joint_loss(model, result.values, data.train_x, data.train_y)
    assert math.isfinite(after)
    assert after < before - 0.05 * abs(before)
    assert set(result.values) == set(initial)
    assert len(result.history) == 3
    for epoch, record in enumerate(result.history, start=1):
        assert record["epoch"] == epoch
        assert {"loss", "test_nll", "test_accuracy", "mixtures"} <= set(record)
        assert math.isfinite(record["loss"]) and math.isfinite(record["test_nll"])
        assert 0.0 <= record["test_accuracy"] <= 1.0
    final = result.history[-1]
    expected_mixture = model.mixtures(result.values)["mixture"].as_dict()
    assert final["mixtures"] == {"mixture": expected_mixture}
    metrics = evaluate(model, result.values, data.test_x, data.test_y)
    assert final["test_nll"] == pytest.approx(metrics["nll"], rel=1e-6)
    assert final["test_accuracy"] == metrics["accuracy"]


def test_fit_map_with_the_same_seed_is_reproducible():
    data = toy_dataset()
    kwargs = dict(epochs=2, batch_size=16, learning_rates=FAST_RATES, progress=False)
    first = fit_map(toy_model(), data, seed=3, **kwargs)
    second = fit_map(toy_model(), data, seed=3, **kwargs)
    other = fit_map(toy_model(), data, seed=4, **kwargs)  # another shuffle order
    assert set(first.values) == set(second.values)
    for key in first.values:
        assert torch.equal(first.values[key], second.values[key]), key
    for (key, a), b in zip(first.model.network.state_dict().items(), second.model.network.state_dict().values()):
        assert torch.equal(a, b), key
    assert first.history[-1]["loss"] == second.history[-1]["loss"]
    assert not torch.equal(first.values["0.weight"], other.values["0.weight"])


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_em_between_steps_runs_and_keeps_the_objective_finite(optimizer):
    data = toy_dataset()
    prior = SoftWeightSharingPrior(
        n_components=4, init_means=(-0.5, 0.5),
        hyperpriors=Hyperpriors(precision_gamma=(2.0, 0.01), zero_proportion_beta=(5.0, 2.0)),
    )
    kwargs = dict(epochs=2, batch_size=20, optimizer=optimizer, learning_rates=FAST_RATES,
                  iterations_per_epoch=5, progress=False)
    with_em = fit_map(toy_model(prior), data, em_every=1, **kwargs)
    model = toy_model(prior)
    assert all(torch.isfinite(v).all() for v in with_em.values.values())
    assert all(math.isfinite(record["loss"]) for record in with_em.history)
    assert math.isfinite(joint_loss(model, with_em.values, data.train_x, data.train_y))
    without_em = fit_map(toy_model(prior), data, **kwargs)
    # EM moved the mixture elsewhere than the optimiser alone did.
    assert not torch.allclose(with_em.values["mixture.precisions"], without_em.values["mixture.precisions"], rtol=1e-3)


def test_fit_map_rejects_unknown_optimizer():
    with pytest.raises(ValueError):
        fit_map(toy_model(), toy_dataset(), epochs=1, optimizer="sgd", progress=False)


def _double(dataset):
    return Dataset(name=dataset.name, task=dataset.task, train_x=dataset.train_x.double(),
                   train_y=dataset.train_y, test_x=dataset.test_x.double(), test_y=dataset.test_y,
                   n_classes=dataset.n_classes)


def test_short_map_run_with_fused_prior_ends_at_the_same_loss_as_with_the_reference_prior(monkeypatch):
    # The fit loop's loss (SoftWeightSharingModel.log_joint: the native kernel, closed-form
    # mixture gradients) against the Pyro model run with the autograd reference density.
    import bayes_sws.inference as inference_module
    import bayes_sws.model as model_module
    from bayes_sws.prior import _reference_group_log_prob_sum

    data = _double(toy_dataset())
    hyper = Hyperpriors(precision_gamma=(2.0, 0.1), dirichlet=2.0)
    prior = SoftWeightSharingPrior(n_components=4, init_means=(-0.5, 0.5), hyperpriors=hyper)

    def fit():
        model = toy_model(prior=prior, prior_weight=0.5)
        model.network.double()
        result = fit_map(model, data, epochs=5, batch_size=16, progress=False,
                         learning_rates=LearningRates(weights=1e-2, means=1e-2, precisions=1e-2, pi=1e-2))
        return result.history[-1]["loss"], result.values

    fused_loss, fused_values = fit()

    calls = []

    def reference(weights, mixture, *, event_dim, chunk_size=None):
        calls.append(1)
        return _reference_group_log_prob_sum(weights, mixture, event_dim)

    monkeypatch.setattr(model_module, "mixture_log_prob_sum", reference)
    monkeypatch.setattr(inference_module, "_point_coordinates", lambda *args: None)
    reference_loss, reference_values = fit()
    assert calls
    assert fused_loss == pytest.approx(reference_loss, rel=1e-9)
    for name, value in reference_values.items():
        torch.testing.assert_close(fused_values[name], value, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("optimizer", ["lbfgs", "cg"])
def test_full_batch_history_loss_is_the_objective_at_the_returned_point(optimizer):
    data = toy_dataset()
    model = toy_model()
    result = fit_map(model, data, epochs=2, optimizer=optimizer, iterations_per_epoch=5, progress=False,
                     learning_rates=FAST_RATES)
    n = data.train_x.shape[0]
    objective = joint_loss(model, result.values, data.train_x, data.train_y)
    assert result.history[-1]["loss"] * n == pytest.approx(objective, rel=1e-6)


def test_partial_init_values_start_the_other_sites_at_the_model_defaults():
    model = toy_model()
    start = {"0.weight": torch.full((8, 4), 0.3)}
    result = fit_map(model, toy_dataset(), epochs=1, batch_size=60, progress=False,
                     learning_rates=LearningRates(weights=1e-9, means=1e-9, precisions=1e-9, pi=1e-9))
    started = fit_map(model, toy_dataset(), epochs=1, batch_size=60, progress=False, init_values=start,
                      learning_rates=LearningRates(weights=1e-9, means=1e-9, precisions=1e-9, pi=1e-9))
    torch.testing.assert_close(started.values["0.weight"], start["0.weight"], rtol=0, atol=1e-6)
    torch.testing.assert_close(started.values["2.weight"], result.values["2.weight"], rtol=0, atol=1e-6)
