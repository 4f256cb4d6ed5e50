"""Tests of bayes_sws.fit: the one fit loop, its resumable state, evaluation, parameter groups."""

import contextlib
import io
import math
import os
import signal

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal, init_to_value
from torch import nn

from bayes_sws import fitting
from bayes_sws.data import Dataset
from bayes_sws.fitting import Callback, Evaluate, evaluate, fit, library_scope, parameter_group, start_fit
from bayes_sws.inference import EMUpdate, fit_map, map_guide, map_loss
from bayes_sws.model import Categorical, Gaussian, SoftWeightSharingModel
from bayes_sws.optim import LearningRates
from bayes_sws.prior import Hyperpriors, SoftWeightSharingPrior
from tests.test_inference import FAST_RATES, joint_loss, toy_dataset, toy_model

F64 = torch.float64


def _saved_and_loaded(state_dict):
    """A state dict through torch.save and a weights-only torch.load, as a checkpoint file would go."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("optimizer, em_every", [("adam", None), ("adam", 2), ("lbfgs", None), ("cg", None)])
def test_a_fit_stopped_and_resumed_from_its_saved_state_ends_exactly_where_an_uninterrupted_one_does(
        optimizer, em_every):
    data = toy_dataset()
    kwargs = dict(batch_size=16, optimizer=optimizer, learning_rates=FAST_RATES, iterations_per_epoch=4,
                  em_every=em_every, seed=5, progress=False)
    whole = fit_map(toy_model(), data, epochs=4, **kwargs)
    first_half = fit_map(toy_model(), data, epochs=2, **kwargs)
    resumed = fit_map(toy_model(), data, epochs=4, state_dict=_saved_and_loaded(first_half.state_dict()),
                      **kwargs)
    assert (resumed.epoch, resumed.step) == (whole.epoch, whole.step)
    assert resumed.history == whole.history
    for name, value in whole.values.items():
        assert torch.equal(resumed.values[name], value), name
    for (name, value), other in zip(whole.model.network.state_dict().items(),
                                    resumed.model.network.state_dict().values()):
        assert torch.equal(other, value), name


@pytest.mark.parametrize("elbo", [Trace_ELBO(), Trace_ELBO(num_particles=2, vectorize_particles=True)],
                         ids=["one-particle", "vectorised-particles"])
def test_a_variational_fit_resumes_exactly_too(elbo):
    """The loop is guide-agnostic: an AutoNormal guide with Trace_ELBO (random draws each step).

    With vectorised particles the ELBO guesses max_plate_nesting from draws on its first call,
    which must not shift a resumed fit's random stream.
    """
    data = toy_dataset().with_validation(0.2, seed=0)
    prior = SoftWeightSharingPrior(n_components=3, init_means=(-0.5, 0.5),
                                   hyperpriors=Hyperpriors(dirichlet=2.0, means_scale=1.0,
                                                           precision_gamma=(2.0, 0.1)))

    def state(epochs, saved=None):
        model = toy_model(prior)
        with library_scope():
            guide = AutoNormal(model, init_loc_fn=init_to_value(values=model.initial_values()), init_scale=0.01)
        fresh_elbo = type(elbo)(num_particles=elbo.num_particles, vectorize_particles=elbo.vectorize_particles)
        fit_state = start_fit(model, guide, data, loss=fresh_elbo.differentiable_loss, batch_size=20, seed=2,
                              learning_rates=FAST_RATES)
        if saved is not None:
            fit_state.load_state_dict(_saved_and_loaded(saved))
        return fit(fit_state, data, epochs=epochs, progress=False,
                   callbacks=[Evaluate("valid", data.valid_x, data.valid_y)])

    whole = state(3)
    resumed = state(3, saved=state(1).state_dict())
    assert resumed.history == whole.history
    for (name, value), other in zip(whole.guide.state_dict().items(), resumed.guide.state_dict().values()):
        assert torch.equal(other, value), name


class _SignalAt(Callback):
    """Sends this process ``signal_number`` after optimiser step ``step``; keeps the state the fit stops with."""

    def __init__(self, step, signal_number):
        self.step, self.signal_number, self.saved = step, signal_number, None

    def on_step(self, state):
        if state.step == self.step:
            os.kill(os.getpid(), self.signal_number)

    def on_interrupt(self, state):
        self.saved = state.state_dict()


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_epoch_stops_after_the_step_with_a_state_that_resumes_exactly(signal_number):
    data = toy_dataset()
    kwargs = dict(batch_size=16, learning_rates=FAST_RATES, em_every=2, seed=5, progress=False)
    whole = fit_map(toy_model(), data, epochs=3, **kwargs)
    steps_per_epoch = whole.step // 3
    stopper = _SignalAt(steps_per_epoch + 2, signal_number)  # two steps into the second epoch
    with pytest.raises(KeyboardInterrupt):
        fit_map(toy_model(), data, epochs=3, callbacks=[stopper], **kwargs)
    saved = _saved_and_loaded(stopper.saved)
    assert (saved["epoch"], saved["step"], saved["epoch_progress"]["steps"]) == (1, steps_per_epoch + 2, 2)
    resumed = fit_map(toy_model(), data, epochs=3, state_dict=saved, **kwargs)
    assert (resumed.epoch, resumed.step) == (whole.epoch, whole.step)
    assert resumed.history == whole.history
    for name, value in whole.values.items():
        assert torch.equal(resumed.values[name], value), name
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the fit's handlers are gone


def test_a_signal_after_the_last_epochs_check_still_stops_the_fit(monkeypatch):
    original = fitting._Signals.deferred

    @contextlib.contextmanager
    def signalled_late(self):
        with original(self) as signals:
            yield signals
            os.kill(os.getpid(), signal.SIGTERM)  # after the loop, before the handlers are restored

    monkeypatch.setattr(fitting._Signals, "deferred", signalled_late)
    with pytest.raises(KeyboardInterrupt):
        fit_map(toy_model(), toy_dataset(), epochs=1, batch_size=16, learning_rates=FAST_RATES, progress=False)


def test_a_signal_the_caller_ignores_does_not_stop_the_fit():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        try:
            state = fit_map(toy_model(), toy_dataset(), epochs=2, batch_size=16, learning_rates=FAST_RATES, seed=5,
                            callbacks=[_SignalAt(2, signal.SIGINT)], progress=False)
        except KeyboardInterrupt:
            pytest.fail("an ignored SIGINT stopped the fit")
        assert state.epoch == 2
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_progress_bar_of_a_fit_resumed_mid_epoch_counts_the_steps_done_before(monkeypatch):
    data = toy_dataset()
    kwargs = dict(batch_size=16, learning_rates=FAST_RATES, seed=5)
    steps_per_epoch = fit_map(toy_model(), data, epochs=1, progress=False, **kwargs).step
    stopper = _SignalAt(steps_per_epoch + 2, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        fit_map(toy_model(), data, epochs=3, callbacks=[stopper], progress=False, **kwargs)
    bars = []

    class Recording(fitting.tqdm):
        def close(self):
            bars.append((self.n, self.total))
            super().close()

    monkeypatch.setattr(fitting, "tqdm", Recording)
    fit_map(toy_model(), data, epochs=3, state_dict=_saved_and_loaded(stopper.saved), progress=True, **kwargs)
    assert bars[0] == (2 * steps_per_epoch, 2 * steps_per_epoch)  # the second epoch's first two steps included


def test_fitting_leaves_the_callers_random_state_and_param_store_untouched():
    store = pyro.get_param_store()
    store["users.own"] = torch.ones(2)
    names = set(store.keys())
    model, data = toy_model(), toy_dataset()
    before = torch.get_rng_state()
    fit_map(model, data, epochs=1, batch_size=20, progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    assert set(store.keys()) == names
    assert torch.equal(store["users.own"], torch.ones(2))
    del store["users.own"]


def test_two_models_fitted_and_loaded_in_one_process_keep_their_own_parameters():
    data = toy_dataset()
    first = fit_map(toy_model(seed=1), data, epochs=2, batch_size=20, learning_rates=FAST_RATES, progress=False)
    scores = evaluate(first.model, first.values, data.test_x, data.test_y)
    outputs = first.model.network(data.test_x).detach()
    # The same architecture, so the same parameter and site names, trained differently.
    second = fit_map(toy_model(seed=2), data, epochs=3, batch_size=10, learning_rates=FAST_RATES, progress=False)
    assert not torch.equal(second.model.network[2].bias, first.model.network[2].bias)
    assert evaluate(first.model, first.values, data.test_x, data.test_y) == scores
    assert torch.equal(first.model.network(data.test_x).detach(), outputs)
    # Guides used outside the library's scope have names of their own in Pyro's store.
    assert first.guide._pyro_name != second.guide._pyro_name


def test_fitting_under_module_local_params_trains_the_prior_weights_as_without():
    data = toy_dataset()
    kwargs = dict(epochs=2, batch_size=20, learning_rates=FAST_RATES, progress=False)
    plain = fit_map(toy_model(), data, **kwargs)
    with pyro.settings.context(module_local_params=True):
        local = fit_map(toy_model(), data, **kwargs)
    start = toy_model().initial_values()
    assert not torch.equal(local.values["0.weight"], start["0.weight"])
    for name, value in plain.values.items():
        assert torch.equal(local.values[name], value), name


def test_pyro_svi_in_the_global_param_store_trains_the_pass_through_parameters_under_the_models_own_name():
    data = toy_dataset()
    model = toy_model()
    guide = map_guide(model)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), loss=map_loss)
    bias = model.network[2].bias.detach().clone()
    for _ in range(3):
        svi.step(data.train_x, data.train_y)
    store = dict(pyro.get_param_store().named_parameters())
    assert any(name.startswith("bayes_sws.model") and name.endswith("2.bias") for name in store)
    assert not torch.equal(model.network[2].bias.detach(), bias)
    pyro.clear_param_store()


def test_callbacks_see_each_step_and_epoch_and_their_random_draws_do_not_change_the_fit():
    data = toy_dataset()
    seen = []

    class Recorder(Callback):
        def on_step(self, state):
            torch.randn(3)
            seen.append(("step", state.step))

        def on_epoch(self, state, record):
            torch.randn(3)
            record["extra"] = 1.0
            seen.append(("epoch", state.epoch))

    kwargs = dict(epochs=2, batch_size=30, learning_rates=FAST_RATES, progress=False)
    with_callback = fit_map(toy_model(), data, callbacks=[Recorder()], **kwargs)
    without = fit_map(toy_model(), data, **kwargs)
    assert seen == [("step", 1), ("step", 2), ("epoch", 1), ("step", 3), ("step", 4), ("epoch", 2)]
    assert [r["extra"] for r in with_callback.history] == [1.0, 1.0]
    assert [r["loss"] for r in with_callback.history] == [r["loss"] for r in without.history]


def test_a_validation_split_is_evaluated_every_epoch():
    data = toy_dataset().with_validation(0.25, seed=0)
    result = fit_map(toy_model(), data, epochs=2, batch_size=20, progress=False)
    scores = evaluate(result.model, result.values, data.valid_x, data.valid_y)
    assert result.history[-1]["valid_nll"] == pytest.approx(scores["nll"], rel=1e-6)
    assert result.history[-1]["valid_accuracy"] == scores["accuracy"]


def test_a_state_of_another_optimizer_is_refused():
    from bayes_sws.errors import FitError

    data = toy_dataset()
    saved = fit_map(toy_model(), data, epochs=1, optimizer="lbfgs", iterations_per_epoch=2,
                    progress=False).state_dict()
    with pytest.raises(FitError, match="lbfgs"):
        fit_map(toy_model(), data, epochs=2, state_dict=saved, progress=False)


def test_em_update_callback_writes_exactly_the_em_step_of_the_current_point():
    """The callback's effect is the EM update itself, not merely some change of the mixture."""
    data = toy_dataset()
    prior = SoftWeightSharingPrior(n_components=4, init_means=(-0.5, 0.5),
                                   hyperpriors=Hyperpriors(precision_gamma=(2.0, 0.01), zero_proportion_beta=(5.0, 2.0)))
    model = toy_model(prior)
    state = start_fit(model, map_guide(model), data, loss=map_loss)
    fit(state, data, epochs=1, progress=False)
    before = state.values
    mixture = model.mixtures(before)["mixture"]
    expected = prior.split(prior.em_update(model.group_weights(before, "mixture"), mixture,
                                           prior_weight=model.prior_weight))
    state.step = 6
    EMUpdate(every=3).on_step(state)
    after = state.values
    for suffix, value in expected.items():
        torch.testing.assert_close(after[f"mixture.{suffix}"], value, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(after["mixture.precisions"], before["mixture.precisions"], rtol=1e-3)
    for name in model.prior_sites:
        assert torch.equal(after[name], before[name])
    state.step = 7  # not a multiple of 3: nothing changes
    EMUpdate(every=3).on_step(state)
    assert all(torch.equal(state.values[k], v) for k, v in after.items())


def test_em_with_one_mixture_per_layer_updates_each_group_from_its_own_weights():
    data = toy_dataset()
    prior = SoftWeightSharingPrior(n_components=3, init_means=(-0.5, 0.5),
                                   hyperpriors=Hyperpriors(precision_gamma=(2.0, 0.01)))
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    model = SoftWeightSharingModel(net, prior=prior, likelihood=Categorical(), prior_weight=1e-2, shared=False)
    state = start_fit(model, map_guide(model), data, loss=map_loss)
    before = state.values
    state.step = 1
    EMUpdate(every=1).on_step(state)
    after = state.values
    assert set(model.groups) == {"mixture.0.weight", "mixture.2.weight"}
    for group in model.groups:
        new = prior.em_update(before[group.removeprefix("mixture.")], model.mixtures(before)[group],
                              prior_weight=model.prior_weight)
        torch.testing.assert_close(after[f"{group}.precisions"], new.precisions, rtol=1e-6, atol=0)
    result = fit_map(model, data, epochs=2, batch_size=20, em_every=2, learning_rates=FAST_RATES,
                     progress=False)
    assert all(math.isfinite(r["loss"]) for r in result.history)


def linear_model(likelihood, out_features):
    torch.manual_seed(6)
    net = nn.Linear(4, out_features).double()
    model = SoftWeightSharingModel(net, prior=SoftWeightSharingPrior(n_components=3), likelihood=likelihood)
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(out_features, 4, generator=g, dtype=F64)
    values = {**model.initial_values(), "weight": weight}
    x = torch.randn(50, 4, generator=g, dtype=F64)
    logits = x @ weight.T + net.bias.detach()  # the bias passes through from the network
    return model, values, x, logits, g


def test_evaluate_gives_hand_computed_accuracy_and_nll_for_a_fixed_linear_classifier():
    model, values, x, logits, g = linear_model(Categorical(), 3)
    y = torch.randint(0, 3, (50,), generator=g)
    metrics = evaluate(model, values, x, y, batch_size=7)  # batches of 7 with a short last one
    nll = (torch.logsumexp(logits, 1) - logits[torch.arange(50), y]).mean()
    accuracy = (logits.argmax(1) == y).double().mean()
    assert 0.0 < float(accuracy) < 1.0
    assert set(metrics) == {"nll", "accuracy"}
    assert metrics["nll"] == pytest.approx(float(nll), rel=1e-12)
    assert metrics["accuracy"] == pytest.approx(float(accuracy), rel=1e-12)


def test_evaluate_gives_hand_computed_mse_and_gaussian_nll_for_a_fixed_linear_regressor():
    s = 0.5
    model, values, x, outputs, g = linear_model(Gaussian(noise_scale=s), 1)
    y = torch.randn(50, generator=g, dtype=F64)
    metrics = evaluate(model, values, x, y, batch_size=7)
    residual = y - outputs.reshape(-1)
    nll = (0.5 * math.log(2 * math.pi * s**2) + residual**2 / (2 * s**2)).mean()
    assert set(metrics) == {"nll", "mse"}
    assert metrics["nll"] == pytest.approx(float(nll), rel=1e-12)
    assert metrics["mse"] == pytest.approx(float((residual**2).mean()), rel=1e-12)


def test_evaluate_scores_a_network_with_dropout_deterministically_without_dropout():
    torch.manual_seed(8)
    net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 3)).double()
    assert net.training  # a freshly built network is in training mode, as fit_map leaves it
    model = SoftWeightSharingModel(net, prior=SoftWeightSharingPrior(n_components=3), likelihood=Categorical())
    values = model.initial_values()
    g = torch.Generator().manual_seed(9)
    x = torch.randn(50, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (50,), generator=g)
    h = x @ values["0.weight"].T + net[0].bias.detach()
    logits = h @ values["2.weight"].T + net[2].bias.detach()
    nll = (torch.logsumexp(logits, 1) - logits[torch.arange(50), y]).mean()
    first, second = evaluate(model, values, x, y), evaluate(model, values, x, y)
    assert first == second
    assert first["nll"] == pytest.approx(float(nll), rel=1e-12)
    assert first["accuracy"] == pytest.approx(float((logits.argmax(1) == y).double().mean()), rel=1e-12)


@pytest.mark.parametrize(
    "site, group",
    [
        ("mixture.means", "means"),
        ("AutoDelta.mixture.means", "means"),
        ("AutoDelta.mixture.0.weight.precisions", "precisions"),
        ("mixture.precisions", "precisions"),
        ("mixture.pi", "pi"),
        ("AutoDelta.mixture.pi_zero", "pi"),
        ("0.weight", "weights"),
        ("AutoDelta.layers.3.weight", "weights"),
        ("network.1.bias", "weights"),
        ("network.5.weight", "weights"),
        ("noise_scale", "weights"),
        ("AutoDelta.noise_scale", "weights"),
    ],
)
def test_parameter_group_maps_site_names_to_learning_rate_groups(site, group):
    assert parameter_group(site) == group


@pytest.mark.parametrize("kwargs", [dict(weights=0.0), dict(means=-1e-3), dict(pi=float("nan"))])
def test_non_positive_learning_rate_raises_value_error(kwargs):
    with pytest.raises(ValueError):
        LearningRates(**kwargs)




def test_a_frozen_layer_is_neither_under_the_prior_nor_trained():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    net[0].requires_grad_(False)
    frozen = net[0].weight.detach().clone()
    model = SoftWeightSharingModel(net, prior=SoftWeightSharingPrior(n_components=3), likelihood=Categorical(),
                                   prior_weight=1e-2)
    assert model.prior_sites == ["2.weight"]
    before = net[2].weight.detach().clone()
    fit_map(model, toy_dataset(), epochs=2, batch_size=20, learning_rates=FAST_RATES, progress=False)
    assert torch.equal(net[0].weight, frozen)
    assert not torch.equal(net[2].weight.detach(), before)


def test_data_and_network_of_different_dtypes_are_a_one_line_fit_error():
    from bayes_sws.errors import FitError

    model = toy_model()
    model.network.double()
    with pytest.raises(FitError, match="float32.*float64"):
        fit_map(model, toy_dataset(), epochs=1, progress=False)


def test_finite_check_lets_finite_gradients_through_even_where_their_sum_overflows():
    parameter = torch.nn.Parameter(torch.zeros(3))
    parameter.grad = torch.tensor([3e38, 3e38, -1.0])  # finite entries, float32 sum inf
    assert fitting._checked_loss(None, torch.tensor(1.5), [parameter]) == 1.5
