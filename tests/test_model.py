"""Tests of bayes_sws.model: the MAP loss of the Pyro model is E(w) + λΩ(w) − log p(θ).

The expected loss is written out in plain float64 torch: the network's forward pass
by hand, the negative log-likelihood by hand, Ω(w) from the mixture's definition and
each hyperprior's log-density from its formula (docs/objective.md §1, §6).
"""

import math

import pyro
import pytest
from pyro import poutine
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDelta, init_to_value
from torch import nn

from bayes_sws.data import Dataset
from bayes_sws.fitting import library_scope
from bayes_sws.kernels import use_backend
from bayes_sws.inference import fit_map, map_loss
from bayes_sws.model import (
    PRIOR_TERM,
    Categorical,
    Gaussian,
    SoftWeightSharingModel,
    prior_parameter_names,
)
from bayes_sws.prior import Hyperpriors, MixturePrior, SoftWeightSharingPrior

F64 = torch.float64
LOG_2PI = math.log(2.0 * math.pi)


@pytest.fixture(autouse=True)
def _fresh_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


# --------------------------------------------------------------------------- hand computations


def make_net(out_features=2, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, out_features)).double()


def hand_forward(net, values):
    """The two-layer tanh net written out; weights from ``values`` when they are sites."""

    def get(name):
        return values[name] if name in values else dict(net.named_parameters())[name].detach()

    def forward(x):
        h = torch.tanh(x @ get("0.weight").T + get("0.bias"))
        return h @ get("2.weight").T + get("2.bias")

    return forward


def hand_categorical_nll(logits, y):
    return (torch.logsumexp(logits, 1) - logits[torch.arange(len(y)), y]).sum()


def hand_gaussian_nll(mean, y, s):
    return (0.5 * LOG_2PI + torch.log(torch.as_tensor(s, dtype=F64)) + 0.5 * ((y - mean.reshape(-1)) / s) ** 2).sum()


def hand_mixture(values, group, prior):
    """π, μ, σ of a group from its site values, zero component first."""
    tau = values[f"{group}.precisions"]
    sigma = tau**-0.5
    free_means = values.get(f"{group}.means", torch.zeros(0, dtype=F64))
    j = prior.n_components
    free_pi = values.get(f"{group}.pi", torch.ones(1, dtype=F64))
    if not prior.zero_component:
        return free_pi, free_means, sigma
    pi_zero = values[f"{group}.pi_zero"] if prior.learns_pi_zero else torch.tensor(prior.pi_zero, dtype=F64)
    mu = torch.cat([torch.zeros(1, dtype=F64), free_means])
    pi = torch.cat([pi_zero.reshape(1), (1 - pi_zero) * free_pi]) if j > 1 else torch.ones(1, dtype=F64)
    return pi, mu, sigma


def hand_omega(w, pi, mu, sigma):
    """Ω(w) = −Σ_i log Σ_j π_j N(w_i|μ_j,σ_j²)."""
    d = w.reshape(-1, 1) - mu
    log_terms = torch.log(pi) - torch.log(sigma) - 0.5 * LOG_2PI - 0.5 * (d / sigma) ** 2
    return -torch.logsumexp(log_terms, 1).sum()


def hand_log_hyperprior(values, group, hyper, prior):
    total = torch.zeros((), dtype=F64)
    if hyper.dirichlet is not None and f"{group}.pi" in values:
        pi, a = values[f"{group}.pi"], hyper.dirichlet
        k = pi.numel()
        total = total + math.lgamma(k * a) - k * math.lgamma(a) + ((a - 1) * pi.log()).sum()
    if hyper.means_scale is not None:
        mu, s = values[f"{group}.means"], hyper.means_scale
        total = total + (-0.5 * math.log(2 * math.pi * s**2) - mu**2 / (2 * s**2)).sum()
    if hyper.precision_gamma is not None:
        tau = values[f"{group}.precisions"]
        shapes = [hyper.precision_gamma] * tau.numel()
        if prior.zero_component and hyper.zero_precision_gamma is not None:
            shapes[0] = hyper.zero_precision_gamma
        for t, (a, b) in zip(tau, shapes):
            total = total + a * math.log(b) - math.lgamma(a) + (a - 1) * torch.log(t) - b * t
    if hyper.zero_proportion_beta is not None and f"{group}.pi_zero" in values:
        p, (a, b) = values[f"{group}.pi_zero"], hyper.zero_proportion_beta
        total = total + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
        total = total + (a - 1) * torch.log(p) + (b - 1) * torch.log1p(-p)
    return total


def perturbed_initial_values(model, seed=1):
    """The model's starting values with every mixture site moved to a random valid point."""
    g = torch.Generator().manual_seed(seed)
    values = model.initial_values()
    for key, value in list(values.items()):
        suffix = key.rsplit(".", 1)[-1]
        if not key.startswith("mixture"):
            continue
        if suffix == "means":
            values[key] = torch.randn(value.shape, generator=g, dtype=F64)
        elif suffix == "precisions":
            values[key] = 0.5 + 5 * torch.rand(value.shape, generator=g, dtype=F64)
        elif suffix == "pi":
            values[key] = torch.softmax(torch.randn(value.shape, generator=g, dtype=F64), 0)
        elif suffix == "pi_zero":
            values[key] = torch.tensor(0.6, dtype=F64)
    return values


def auto_delta_loss(model, x, y, *, data_size=None, init=None):
    """The AutoDelta + Trace_ELBO loss and the guide's (constrained) values.

    Also checks that fit_map's cheaper ``map_loss`` (no guide log-density) equals it.
    """
    guide = AutoDelta(model, init_loc_fn=init_to_value(values=init or perturbed_initial_values(model)))
    loss = Trace_ELBO().differentiable_loss(model, guide, x, y, data_size=data_size)
    torch.testing.assert_close(map_loss(model, guide, x, y, data_size=data_size), loss, rtol=1e-12, atol=1e-12)
    return loss, {k: v.detach() for k, v in guide.median().items()}


def test_map_loss_replays_the_guide_where_latent_sites_sit_in_subsampled_plates():
    def data_plate(y):
        return pyro.plate("data", 10, subsample=torch.tensor([1, 4, 7]))

    def model(y):
        scale = pyro.sample("scale", pyro.distributions.LogNormal(0.0, 1.0))
        with data_plate(y):
            local = pyro.sample("local", pyro.distributions.Normal(0.0, scale))
            pyro.sample("y", pyro.distributions.Normal(local, 1.0), obs=y)

    y = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    guide = AutoDelta(model, create_plates=data_plate, init_loc_fn=init_to_value(
        values={"scale": torch.tensor(1.5, dtype=F64), "local": torch.tensor([0.1, -0.2, 0.3], dtype=F64)}))
    expected = Trace_ELBO().differentiable_loss(model, guide, y)
    torch.testing.assert_close(map_loss(model, guide, y), expected, rtol=1e-12, atol=1e-12)


def test_map_loss_after_the_param_store_was_cleared_puts_the_guide_parameters_back():
    model = four_component_model(prior_weight=0.2)
    x, y = random_data()
    guide = AutoDelta(model, init_loc_fn=init_to_value(values=perturbed_initial_values(model)))
    before = map_loss(model, guide, x, y)
    names = set(pyro.get_param_store().keys())
    pyro.clear_param_store()
    torch.testing.assert_close(map_loss(model, guide, x, y), before, rtol=1e-12, atol=1e-12)
    assert set(pyro.get_param_store().keys()) == names
    torch.testing.assert_close(map_loss(model, guide, x, y), Trace_ELBO().differentiable_loss(model, guide, x, y),
                               rtol=1e-12, atol=1e-12)


def test_svi_with_map_loss_trains_the_guide_to_the_conjugate_posterior_mode():
    def model(y):
        mean = pyro.sample("mean", pyro.distributions.Normal(0.0, 10.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", pyro.distributions.Normal(mean, 1.0), obs=y)

    y = torch.linspace(2.0, 4.0, 20, dtype=F64)
    guide = AutoDelta(model, init_loc_fn=init_to_value(values={"mean": torch.tensor(-4.0, dtype=F64)}))
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), loss=map_loss)
    for _ in range(300):
        svi.step(y)
    mode = y.sum() / (len(y) + 1 / 10.0**2)  # prior N(0, 10²), unit noise
    assert float(guide.median(y)["mean"]) == pytest.approx(float(mode), abs=1e-3)


def test_map_loss_keeps_the_observation_of_a_site_that_was_latent_in_the_guide_prototype():
    def model(x, y=None):
        slope = pyro.sample("slope", pyro.distributions.LogNormal(0.0, 1.0))
        return pyro.sample("y", pyro.distributions.Normal(x * slope, 1.0).to_event(1), obs=y)

    x = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    guide = AutoDelta(model, init_loc_fn=init_to_value(values={"slope": torch.tensor(1.5, dtype=F64),
                                                              "y": torch.zeros(3, dtype=F64)}))
    guide(x)  # the prototype sees y as latent (built for prediction)
    y = torch.tensor([0.5, 0.1, 4.0], dtype=F64)
    with pytest.warns(UserWarning, match="non-auxiliary"):
        expected = Trace_ELBO().differentiable_loss(model, guide, x, y)
    torch.testing.assert_close(map_loss(model, guide, x, y), expected, rtol=1e-12, atol=1e-12)


def test_map_loss_with_module_local_guide_parameters_equals_trace_elbo():
    def model():
        pyro.sample("a", pyro.distributions.Normal(0.0, 1.0))

    with pyro.settings.context(module_local_params=True):
        guide = AutoDelta(model, init_loc_fn=init_to_value(values={"a": torch.tensor(0.7, dtype=F64)}))
        torch.testing.assert_close(map_loss(model, guide), Trace_ELBO().differentiable_loss(model, guide),
                                   rtol=1e-12, atol=1e-12)


def random_data(n=12, classes=2, seed=2, regression=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=F64)
    if regression:
        return x, torch.randn(n, generator=g, dtype=F64)
    return x, torch.randint(0, classes, (n,), generator=g)


ALL_HYPER = Hyperpriors(
    dirichlet=2.5,
    means_scale=0.7,
    precision_gamma=(3.0, 0.5),
    zero_precision_gamma=(40.0, 2.0),
    zero_proportion_beta=(5.0, 2.0),
)


def four_component_model(*, prior_weight):
    """A small classifier under a four-component prior with every hyperprior."""
    return SoftWeightSharingModel(
        make_net(), prior=SoftWeightSharingPrior(n_components=4, hyperpriors=ALL_HYPER),
        likelihood=Categorical(), prior_weight=prior_weight,
    )


LOSS_CASES = {
    "flat_hyperpriors": dict(prior=dict(n_components=4), model=dict()),
    "all_hyperpriors": dict(prior=dict(n_components=4, hyperpriors=ALL_HYPER), model=dict()),
    "per_layer_mixtures": dict(
        prior=dict(n_components=3, hyperpriors=ALL_HYPER), model=dict(shared=False, include_biases=True)
    ),
    "fixed_pi_zero_no_zero_component_hyper": dict(
        prior=dict(n_components=3, pi_zero=0.9, hyperpriors=Hyperpriors(precision_gamma=(2.0, 1.0))), model=dict()
    ),
    "no_zero_component": dict(
        prior=dict(n_components=3, zero_component=False, hyperpriors=Hyperpriors(dirichlet=0.8, means_scale=2.0)),
        model=dict(),
    ),
}


def expected_loss(model, values, x, y, *, scale=1.0, nll=None):
    logits = hand_forward(model.network, values)(x)
    e = hand_categorical_nll(logits, y) if nll is None else nll(logits)
    prior, hyper = model.prior, model.prior.hyperpriors
    total = scale * e
    for group, names in model.groups.items():
        w = torch.cat([values[name].reshape(-1) for name in names])
        total = total + model.prior_weight * hand_omega(w, *hand_mixture(values, group, prior))
        total = total - hand_log_hyperprior(values, group, hyper, prior)
    return total


def loss_case_model(case: str) -> SoftWeightSharingModel:
    spec = LOSS_CASES[case]
    return SoftWeightSharingModel(
        make_net(), prior=SoftWeightSharingPrior(**spec["prior"]), likelihood=Categorical(),
        prior_weight=0.37, **spec["model"],
    )


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_auto_delta_loss_equals_nll_plus_lambda_omega_minus_log_hyperpriors(case):
    model = loss_case_model(case)
    x, y = random_data()
    loss, values = auto_delta_loss(model, x, y)
    expected_groups = (
        {"mixture"} if model.shared else {f"mixture.{name}" for name in model.prior_sites}
    )
    assert set(model.groups) == expected_groups
    torch.testing.assert_close(loss, expected_loss(model, values, x, y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_map_loss_and_its_gradients_equal_trace_elbo_on_an_auto_delta_guide(case):
    model = loss_case_model(case)
    x, y = random_data()
    guide = AutoDelta(model, init_loc_fn=init_to_value(values=perturbed_initial_values(model)))
    guide(x, y, data_size=30)
    parameters = [p for _, p in sorted(pyro.get_param_store().named_parameters())]
    losses = [loss(model, guide, x, y, data_size=30) for loss in (map_loss, Trace_ELBO().differentiable_loss)]
    gradients = [torch.autograd.grad(loss, parameters) for loss in losses]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=1e-12)
    for ours, elbo in zip(*gradients):
        torch.testing.assert_close(ours, elbo, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shared", [True, False])
def test_each_mixture_group_has_one_prior_factor_over_all_its_weights(shared):
    model = SoftWeightSharingModel(make_net(), prior=SoftWeightSharingPrior(n_components=3), likelihood=Categorical(),
                                   prior_weight=0.37, shared=shared, include_biases=True)
    x, y = random_data()
    values = perturbed_initial_values(model)
    trace = poutine.trace(poutine.condition(model, data=values)).get_trace(x, y)
    trace.compute_log_prob()
    factors = {name for name in trace.nodes if name.endswith(f".{PRIOR_TERM}")}
    assert factors == {f"{group}.{PRIOR_TERM}" for group in model.groups}
    for group, names in model.groups.items():
        mixture = model.mixtures(values)[group]
        expected = sum(MixturePrior(mixture, event_shape=values[name].shape).log_prob(values[name]) for name in names)
        site = trace.nodes[f"{group}.{PRIOR_TERM}"]
        torch.testing.assert_close(site["log_prob_sum"], 0.37 * expected, rtol=1e-12, atol=1e-12)
    for name in model.prior_sites:  # a weight's density is counted in its group's factor only
        assert float(trace.nodes[name]["log_prob_sum"]) == 0.0


def test_a_model_run_evaluates_each_group_prior_only_when_a_density_is_asked_for(monkeypatch):
    # Predictive, evaluation and guide set-up run the model for its draws and outputs
    # only: the group's prior (a kernel pass over all its weights) waits for log_prob.
    import bayes_sws.model as model_module
    calls = []
    original = model_module.mixture_log_prob_sum
    monkeypatch.setattr(model_module, "mixture_log_prob_sum",
                        lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    model = SoftWeightSharingModel(make_net(), prior=SoftWeightSharingPrior(n_components=3), likelihood=Categorical(),
                                   prior_weight=0.37, shared=False)
    x, y = random_data()
    values = perturbed_initial_values(model)
    trace = poutine.trace(poutine.condition(model, data=values)).get_trace(x, y)
    assert calls == []
    trace.compute_log_prob()
    assert len(calls) == len(model.groups)
    for group, names in model.groups.items():
        mixture = model.mixtures(values)[group]
        expected = sum(MixturePrior(mixture, event_shape=values[name].shape).log_prob(values[name]) for name in names)
        torch.testing.assert_close(trace.nodes[f"{group}.{PRIOR_TERM}"]["fn"].log_factor, expected,
                                   rtol=1e-12, atol=1e-12)


def test_a_group_prior_broadcasts_weight_sites_of_different_batch_shapes():
    # One site conditioned on two draws, the other a single value: the network runs
    # once per draw (outputs broadcast the sites' leading dimensions), and the group's
    # prior is, per draw, the sum of the sites' log-densities.
    model = SoftWeightSharingModel(make_net(), prior=SoftWeightSharingPrior(n_components=3), likelihood=Categorical(),
                                   prior_weight=0.37)
    x, y = random_data()
    values = perturbed_initial_values(model)
    values["0.weight"] = torch.stack([values["0.weight"], -values["0.weight"]])
    trace = poutine.trace(poutine.condition(model, data=values)).get_trace(x, y)
    trace.compute_log_prob()
    mixture = model.mixtures(values)["mixture"]
    expected = sum(MixturePrior(mixture, event_shape=model.network.get_parameter(name).shape).log_prob(values[name])
                   for name in model.prior_sites)
    assert expected.shape == (2,) and trace.nodes["_RETURN"]["value"].shape == (2, *y.shape, 2)
    torch.testing.assert_close(trace.nodes["mixture.prior"]["unscaled_log_prob"], expected, rtol=1e-12, atol=1e-12)


def test_minibatch_loss_scales_nll_by_n_over_b_and_keeps_prior_and_hyperprior_unscaled():
    model = four_component_model(prior_weight=0.2)
    x, y = random_data(n=20)
    xb, yb = x[:5], y[:5]
    loss, values = auto_delta_loss(model, xb, yb, data_size=20)
    torch.testing.assert_close(loss, expected_loss(model, values, xb, yb, scale=20 / 5), rtol=1e-12, atol=1e-12)


def test_loss_gradient_with_respect_to_weights_equals_nll_gradient_plus_lambda_omega_gradient():
    model = four_component_model(prior_weight=0.37)
    x, y = random_data()
    guide = AutoDelta(model, init_loc_fn=init_to_value(values=perturbed_initial_values(model)))
    loss = Trace_ELBO().differentiable_loss(model, guide, x, y)
    store = dict(pyro.get_param_store().named_parameters())
    w_param = store["AutoDelta.0.weight"]  # real support: unconstrained == constrained
    (grad,) = torch.autograd.grad(loss, [w_param])

    values = {k: v.detach() for k, v in guide.median().items()}
    w = values["0.weight"].clone().requires_grad_()
    e = hand_categorical_nll(hand_forward(model.network, {**values, "0.weight": w})(x), y)
    (e_grad,) = torch.autograd.grad(e, [w])
    pi, mu, sigma = hand_mixture(values, "mixture", model.prior)
    d = w.detach().reshape(-1, 1) - mu
    comp = pi * torch.exp(-0.5 * (d / sigma) ** 2) / sigma
    gamma = comp / comp.sum(1, keepdim=True)
    omega_grad = (gamma * d / sigma**2).sum(1).reshape(w.shape)
    torch.testing.assert_close(grad, e_grad + 0.37 * omega_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("data_size", [None, 30])
def test_gaussian_likelihood_with_fixed_noise_gives_loss_with_gaussian_nll(data_size):
    model = SoftWeightSharingModel(
        make_net(out_features=1), prior=SoftWeightSharingPrior(n_components=3, hyperpriors=ALL_HYPER),
        likelihood=Gaussian(noise_scale=0.3), prior_weight=0.5,
    )
    x, y = random_data(n=10, regression=True)
    loss, values = auto_delta_loss(model, x, y, data_size=data_size)
    scale = (data_size or 10) / 10
    expected = expected_loss(model, values, x, y, scale=scale, nll=lambda out: hand_gaussian_nll(out, y, 0.3))
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("data_size", [None, 30])
def test_gaussian_likelihood_with_learned_noise_has_one_scalar_noise_site_in_the_loss(data_size):
    model = SoftWeightSharingModel(
        make_net(out_features=1), prior=SoftWeightSharingPrior(n_components=3),
        likelihood=Gaussian(init_noise_scale=0.4), prior_weight=0.5,
    )
    x, y = random_data(n=10, regression=True)
    init = perturbed_initial_values(model)
    assert init["noise_scale"].shape == ()
    loss, values = auto_delta_loss(model, x, y, data_size=data_size, init=init)
    # One global noise scale, not one per data point.
    assert values["noise_scale"].shape == ()
    s = values["noise_scale"]
    torch.testing.assert_close(s, torch.tensor(0.4, dtype=F64))
    scale = (data_size or 10) / 10
    expected = expected_loss(model, values, x, y, scale=scale, nll=lambda out: hand_gaussian_nll(out, y, s))
    half_normal_log_density = 0.5 * math.log(2 / math.pi) - 0.5 * s**2  # s ~ HalfNormal(1), proper
    torch.testing.assert_close(loss, expected - half_normal_log_density, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("hyper", [Hyperpriors(), ALL_HYPER], ids=["flat", "hyperpriors"])
def test_zero_prior_weight_drops_the_prior_term_exactly(hyper):
    model = SoftWeightSharingModel(
        make_net(), prior=SoftWeightSharingPrior(n_components=4, hyperpriors=hyper),
        likelihood=Categorical(), prior_weight=0.0,
    )
    x, y = random_data()
    init = perturbed_initial_values(model)
    init["0.weight"] = init["0.weight"] + 50.0  # Ω would be enormous here
    loss, values = auto_delta_loss(model, x, y, init=init)
    e = hand_categorical_nll(hand_forward(model.network, values)(x), y)
    expected = e - hand_log_hyperprior(values, "mixture", hyper, model.prior)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    if hyper == Hyperpriors():
        torch.testing.assert_close(loss, e, rtol=1e-14, atol=0)


# --------------------------------------------------------------------------- structure


def conv_net():
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3),  # 4x4 -> 2x2
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8, 3),
        nn.LayerNorm(3),
    )


@pytest.mark.parametrize(
    "include_biases, expected",
    [(False, ["0.weight", "4.weight"]), (True, ["0.weight", "0.bias", "4.weight", "4.bias"])],
)
def test_prior_parameter_names_pick_linear_and_conv_weights_and_optionally_biases(include_biases, expected):
    assert prior_parameter_names(conv_net(), include_biases=include_biases) == expected


def test_prior_parameter_names_of_a_bare_linear_layer_have_no_prefix():
    assert prior_parameter_names(nn.Linear(2, 2), include_biases=True) == ["weight", "bias"]


def test_non_prior_parameters_pass_through_as_the_networks_own_and_get_learned():
    net = conv_net()
    model = SoftWeightSharingModel(
        net, prior=SoftWeightSharingPrior(n_components=3), likelihood=Categorical(), prior_weight=1e-3,
    )
    passthrough = ["0.bias", "1.weight", "1.bias", "4.bias", "5.weight", "5.bias"]
    assert model.passthrough == passthrough
    assert model.prior_sites == ["0.weight", "4.weight"]

    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 1, 4, 4, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    with pyro.settings.context(module_local_params=True):
        guide = AutoDelta(model, init_loc_fn=init_to_value(values=model.initial_values()))
        loss = Trace_ELBO().differentiable_loss(model, guide, x, y)
    assert len(pyro.get_param_store()) == 0
    parameters = dict(net.named_parameters())
    grads = torch.autograd.grad(loss, [parameters[name] for name in passthrough])
    assert all(grad.abs().sum() > 0 for grad in grads)

    data = Dataset(name="toy", task="classification", train_x=x, train_y=y, test_x=x, test_y=y, n_classes=3)
    initial = {name: p.detach().clone() for name, p in net.named_parameters()}
    fit_map(model, data, epochs=2, batch_size=20, progress=False)
    for name in ("1.weight", "5.weight", "5.bias"):
        assert not torch.equal(parameters[name].detach(), initial[name])


@pytest.mark.parametrize("prior_weight", [-1e-3, -1.0, float("nan")])
def test_negative_prior_weight_raises_value_error(prior_weight):
    with pytest.raises(ValueError):
        SoftWeightSharingModel(
            make_net(), prior=SoftWeightSharingPrior(), likelihood=Categorical(), prior_weight=prior_weight
        )


@pytest.mark.parametrize("shared", [True, False])
def test_mixtures_of_values_put_the_zero_component_first_with_mean_zero(shared):
    model = SoftWeightSharingModel(
        make_net(), prior=SoftWeightSharingPrior(n_components=4), likelihood=Categorical(), shared=shared,
    )
    values = perturbed_initial_values(model)
    mixtures = model.mixtures(values)
    assert list(mixtures) == list(model.groups)
    for group, mixture in mixtures.items():
        pi_zero = values[f"{group}.pi_zero"]
        assert mixture.means[0] == 0
        torch.testing.assert_close(mixture.means[1:], values[f"{group}.means"], rtol=0, atol=0)
        torch.testing.assert_close(mixture.proportions[0], pi_zero, rtol=1e-14, atol=0)
        torch.testing.assert_close(mixture.proportions[1:], (1 - pi_zero) * values[f"{group}.pi"], rtol=1e-12, atol=0)
        torch.testing.assert_close(mixture.scales, values[f"{group}.precisions"] ** -0.5, rtol=1e-14, atol=0)


def test_per_layer_mixtures_read_only_their_own_sites():
    model = SoftWeightSharingModel(
        make_net(), prior=SoftWeightSharingPrior(n_components=3), likelihood=Categorical(), shared=False,
    )
    values = perturbed_initial_values(model)
    values["mixture.2.weight.means"] = torch.tensor([5.0, 6.0], dtype=F64)
    mixtures = model.mixtures(values)
    torch.testing.assert_close(mixtures["mixture.2.weight"].means, torch.tensor([0.0, 5.0, 6.0], dtype=F64))
    torch.testing.assert_close(mixtures["mixture.0.weight"].means[1:], values["mixture.0.weight.means"])


def test_initial_values_hold_network_weights_and_split_initial_mixture():
    net = make_net()
    prior = SoftWeightSharingPrior(n_components=4, init_means=(-0.5, 0.5))
    model = SoftWeightSharingModel(net, prior=prior, likelihood=Categorical())
    values = model.initial_values()
    assert set(values) == {"0.weight", "2.weight", "mixture.means", "mixture.precisions", "mixture.pi", "mixture.pi_zero"}
    torch.testing.assert_close(values["0.weight"], net[0].weight.detach(), rtol=0, atol=0)
    torch.testing.assert_close(values["mixture.means"], torch.tensor([-0.5, 0.0, 0.5], dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(values["mixture.precisions"], torch.full((4,), 16.0, dtype=F64), rtol=1e-14, atol=0)
    torch.testing.assert_close(values["mixture.pi_zero"], torch.tensor(0.25, dtype=F64), rtol=1e-14, atol=0)


# --------------------------------------------------------------------------- the fit loop's MAP loss: no Pyro run

POINT_CASES = {
    **{case: (loss_case_model, case) for case in LOSS_CASES},
    "no_prior_weight": (lambda case: SoftWeightSharingModel(
        make_net(), prior=SoftWeightSharingPrior(n_components=4, hyperpriors=ALL_HYPER), likelihood=Categorical(),
        prior_weight=0.0), None),
    "regression_fixed_noise": (lambda case: SoftWeightSharingModel(
        make_net(out_features=1), prior=SoftWeightSharingPrior(n_components=3, hyperpriors=ALL_HYPER),
        likelihood=Gaussian(noise_scale=0.4), prior_weight=0.37), None),
}


def point_case(case):
    build, argument = POINT_CASES[case]
    model = build(argument)
    x, y = random_data(regression=isinstance(model.likelihood, Gaussian))
    return model, x, y


def guide_at_random_point(model, x, y):
    guide = AutoDelta(model, init_loc_fn=init_to_value(values=perturbed_initial_values(model)))
    guide(x, y, data_size=30)
    return guide


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("case", list(POINT_CASES))
def test_map_loss_in_the_fit_loops_scope_skips_the_pyro_run_and_equals_trace_elbo_with_its_gradients(
        case, backend, monkeypatch):
    model, x, y = point_case(case)
    calls = []
    original = SoftWeightSharingModel.log_joint
    monkeypatch.setattr(SoftWeightSharingModel, "log_joint", lambda *a, **k: calls.append(1) or original(*a, **k))
    with library_scope(), use_backend(backend):
        guide = guide_at_random_point(model, x, y)
        parameters = list(guide.parameters())
        losses = [loss(model, guide, x, y, data_size=30) for loss in (map_loss, Trace_ELBO().differentiable_loss)]
        gradients = [torch.autograd.grad(loss, parameters, allow_unused=True) for loss in losses]
    assert calls == [1]  # map_loss took SoftWeightSharingModel.log_joint; Trace_ELBO ran the model
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=1e-12)
    for ours, elbo in zip(*gradients):
        torch.testing.assert_close(ours, elbo, rtol=1e-10, atol=1e-12)


def test_map_loss_under_a_pyro_handler_runs_the_model_so_the_handler_applies():
    model, x, y = point_case("all_hyperpriors")
    with library_scope():
        guide = guide_at_random_point(model, x, y)
        plain = map_loss(model, guide, x, y, data_size=30)
        with poutine.scale(scale=3.0):
            scaled = map_loss(model, guide, x, y, data_size=30)
    torch.testing.assert_close(scaled, 3.0 * plain, rtol=1e-12, atol=1e-12)


def test_map_loss_with_a_learned_noise_scale_runs_the_model_and_equals_trace_elbo(monkeypatch):
    model = SoftWeightSharingModel(make_net(out_features=1), prior=SoftWeightSharingPrior(n_components=3),
                                   likelihood=Gaussian(), prior_weight=0.37)
    x, y = random_data(regression=True)
    monkeypatch.setattr(SoftWeightSharingModel, "log_joint", None)  # would raise if called
    with library_scope():
        guide = guide_at_random_point(model, x, y)
        torch.testing.assert_close(map_loss(model, guide, x, y, data_size=30),
                                   Trace_ELBO().differentiable_loss(model, guide, x, y, data_size=30),
                                   rtol=1e-12, atol=1e-12)


def test_the_point_losss_second_derivatives_and_a_second_backward_pass_equal_trace_elbos():
    model, x, y = point_case("all_hyperpriors")
    with library_scope():
        guide = guide_at_random_point(model, x, y)
        parameters = list(guide.parameters())
        direction = [torch.randn_like(p) for p in parameters]
        curvature, twice = [], []
        for loss in (map_loss, Trace_ELBO().differentiable_loss):
            value = loss(model, guide, x, y, data_size=30)
            gradients = torch.autograd.grad(value, parameters, create_graph=True)
            slope = sum((g * d).sum() for g, d in zip(gradients, direction))
            curvature.append(torch.autograd.grad(slope, parameters))
            for p in parameters:
                p.grad = None
            value = loss(model, guide, x, y, data_size=30)
            value.backward(retain_graph=True)
            value.backward()
            twice.append([p.grad.clone() for p in parameters])
    for ours, elbo in zip(*curvature):
        torch.testing.assert_close(ours, elbo, rtol=1e-9, atol=1e-10)
    for ours, elbo in zip(*twice):
        torch.testing.assert_close(ours, elbo, rtol=1e-10, atol=1e-12)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4, bias=False)
        self.second = nn.Linear(4, 4, bias=False)
        self.second.weight = self.first.weight  # one parameter under two names
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


class _Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight


def _tied_network():
    torch.manual_seed(3)
    return _Tied().double()


def _parametrised_network():
    network = make_net()
    torch.nn.utils.parametrize.register_parametrization(network[0], "weight", _Doubled())
    return network


@pytest.mark.parametrize("build", [make_net, _tied_network, _parametrised_network])
def test_outputs_at_site_values_equal_functional_call_and_leave_the_networks_parameters_in_place(build):
    network = build()
    model = SoftWeightSharingModel(network, prior=SoftWeightSharingPrior(n_components=3), likelihood=Categorical())
    x, _ = random_data()
    g = torch.Generator().manual_seed(4)
    values = {name: torch.randn(network.get_parameter(name).shape, generator=g, dtype=F64)
              for name in model.prior_sites}
    before = {name: id(p) for name, p in network.named_parameters(remove_duplicate=False)}
    torch.testing.assert_close(model.outputs(values, x), torch.func.functional_call(network, values, (x,)),
                               rtol=0, atol=0)
    with pytest.raises(RuntimeError):
        model.outputs(values, x[:, :3])  # a forward pass that fails puts the parameters back too
    assert {name: id(p) for name, p in network.named_parameters(remove_duplicate=False)} == before


def test_map_loss_in_the_fit_loops_scope_reads_a_guide_parameter_that_was_replaced():
    # the lean path's per-guide cache must not keep the parameters a guide had at its first call
    model, x, y = point_case("all_hyperpriors")
    with library_scope():
        guide = guide_at_random_point(model, x, y)
        map_loss(model, guide, x, y, data_size=30)
        state = {name: value.detach() + 0.1 for name, value in guide.state_dict().items()}
        guide.load_state_dict(state, assign=True)  # new Parameter objects
        loss = map_loss(model, guide, x, y, data_size=30)
        expected = Trace_ELBO().differentiable_loss(model, guide, x, y, data_size=30)
        gradients = [torch.autograd.grad(value, list(guide.parameters())) for value in (loss, expected)]
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for ours, elbo in zip(*gradients):
        torch.testing.assert_close(ours, elbo, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("hyper", [ALL_HYPER, Hyperpriors()])
def test_the_point_losss_second_derivatives_without_a_prior_term_equal_trace_elbos(hyper):
    # prior_weight 0: the group's value (its hyperpriors) does not depend on the weights
    model = SoftWeightSharingModel(make_net(), prior=SoftWeightSharingPrior(n_components=4, hyperpriors=hyper),
                                   likelihood=Categorical(), prior_weight=0.0)
    x, y = random_data()
    with library_scope():
        guide = guide_at_random_point(model, x, y)
        parameters = list(guide.parameters())
        direction = [torch.randn_like(p) for p in parameters]
        curvature = []
        for loss in (map_loss, Trace_ELBO().differentiable_loss):
            gradients = torch.autograd.grad(loss(model, guide, x, y, data_size=30), parameters, create_graph=True,
                                            allow_unused=True, materialize_grads=True)  # flat: π, μ, σ unused
            slope = sum((g * d).sum() for g, d in zip(gradients, direction))
            curvature.append(torch.autograd.grad(slope, parameters, allow_unused=True, materialize_grads=True))
    for ours, elbo in zip(*curvature):
        torch.testing.assert_close(ours, elbo, rtol=1e-9, atol=1e-10)


def test_outputs_at_site_values_follow_a_network_put_in_place_of_the_models_own():
    # the places the values are swapped into must be those of model.network now, not of the first network
    model = SoftWeightSharingModel(make_net(), prior=SoftWeightSharingPrior(n_components=3), likelihood=Categorical())
    x, _ = random_data()
    values = {name: torch.randn(p.shape, dtype=F64) for name, p in model.network.named_parameters()
              if name in model.prior_sites}
    model.outputs(values, x)
    model.network = make_net(seed=5)  # same architecture, other pass-through values
    torch.testing.assert_close(model.outputs(values, x), torch.func.functional_call(model.network, values, (x,)),
                               rtol=0, atol=0)


def test_map_loss_in_the_fit_loops_scope_keeps_no_guide_alive():
    # the per-guide cache is weakly keyed: its entry must not hold the guide (a bare layer's sites sit on it)
    import gc
    import weakref

    from bayes_sws.inference import map_guide

    model = SoftWeightSharingModel(nn.Linear(4, 2).double(), prior=SoftWeightSharingPrior(n_components=3),
                                   likelihood=Categorical())
    x, y = random_data()
    with library_scope():
        guide = map_guide(model)
        map_loss(model, guide, x, y, data_size=30)
    alive = weakref.ref(guide)
    del guide
    gc.collect()
    assert alive() is None
