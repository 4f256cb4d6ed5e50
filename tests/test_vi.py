"""Tests of the variational half: guide draws, VI fits against analytic posteriors, local
reparameterisation, what λ means, resume, and a VI run end to end."""

import contextlib
import math
from pathlib import Path

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoGuide, AutoNormal, init_to_value
from pyro.infer.autoguide.initialization import InitMessenger
from torch import nn

import bayes_linear as linear
from bayes_sws.experiment import load_checkpoint, run
from bayes_sws.fitting import Callback, library_scope
from bayes_sws.inference import fit_map, fit_vi, sample_guide, vi_guide, vi_loss
from bayes_sws.local_reparam import mean_field_part, weight_posterior
from bayes_sws.model import Categorical, Gaussian, SoftWeightSharingModel
from bayes_sws.optim import LearningRates
from bayes_sws.prior import MixturePrior, SoftWeightSharingPrior
from bayes_sws.spec import load_spec
from test_inference import toy_dataset, toy_model

ROOT = Path(__file__).resolve().parents[1]
RATES = LearningRates(weights=0.03, means=0.01, precisions=0.01, pi=0.01)


@pytest.fixture(autouse=True)
def _fresh_param_store_one_thread():
    # tiny tensors: a second thread only waits for the other agents' cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()
    torch.set_num_threads(threads)


def test_draws_from_a_map_guide_are_its_point_repeated_and_leave_the_callers_rng_alone():
    data, model = toy_dataset(), toy_model()
    state = fit_map(model, data, epochs=2, progress=False)
    before = torch.get_rng_state()
    draws = sample_guide(model, state.guide, num_draws=4, seed=0)
    assert torch.equal(torch.get_rng_state(), before)
    assert draws.method == "map" and (draws.n_chains, draws.n_draws) == (1, 4)
    for name, value in state.values.items():
        assert draws.samples[name].shape == (1, 4, *value.shape)
        assert torch.equal(draws.samples[name], value.expand(1, 4, *value.shape))


def test_a_map_checkpoints_posterior_is_one_chain_of_one_draw_the_point(tmp_path):
    spec = load_spec(ROOT / "models/digits.toml", overrides=["inference.epochs=1"])
    run(spec, out_dir=tmp_path, progress=False)
    fitted = load_checkpoint(tmp_path / "checkpoint.pt")
    draws = fitted.posterior_samples(num_draws=50, seed=1)
    assert draws.method == "map" and (draws.n_chains, draws.n_draws) == (1, 1)
    assert fitted.metrics["metrics_at"] == "map point"
    assert set(draws.samples) == set(fitted.values)
    for name, value in fitted.values.items():
        assert torch.equal(draws.samples[name][0, 0], value)


def _linear_fit(prior_weight: float, weight_guide: str, prior_precision: float = linear.PRIOR_PRECISION):
    data, model = linear.dataset(), linear.model(prior_weight, prior_precision)
    state = fit_vi(model, data, epochs=800, batch_size=linear.N, learning_rates=RATES, num_particles=32,
                   init_scale=0.1, weight_guide=weight_guide, seed=0, progress=False)
    draws = sample_guide(model, state.guide, num_draws=20000, seed=1)
    assert draws.method == "vi"
    return data, linear.weight_draws(draws)


# Tolerances: 20,000 draws leave a Monte Carlo error of about 0.7 % of a standard deviation
# on the means and 1 % on the variances; what remains is Adam's noise at the end of the fit
# (measured: means within 0.12 sd, covariances within 5 %, at most).


def test_full_rank_vi_recovers_the_analytic_posterior_mean_and_covariance():
    data, draws = _linear_fit(1.0, "full")
    mean, covariance, _ = linear.posterior(data)
    assert ((draws.mean(0) - mean).abs() / covariance.diagonal().sqrt()).max() < 0.2
    assert (torch.cov(draws.T) - covariance).norm() / covariance.norm() < 0.1


def test_mean_field_vi_recovers_the_means_and_understates_the_variances_as_theory_says():
    data, draws = _linear_fit(1.0, "diagonal")
    mean, covariance, precision = linear.posterior(data)
    assert ((draws.mean(0) - mean).abs() / covariance.diagonal().sqrt()).max() < 0.2
    variances = draws.var(0)
    # KL(q || p) over factorised Gaussians is minimised at variance 1 / A_ii (Bishop, PRML §10.1.2) ...
    assert torch.allclose(variances, 1 / precision.diagonal(), rtol=0.15)
    # ... below the true marginal variance (A⁻¹)_ii: by a factor 0.26 to 0.67 for these inputs
    assert (variances < 0.8 * covariance.diagonal()).all()
    assert torch.cov(draws.T).fill_diagonal_(0).abs().max() < 0.05 * variances.min()


def test_lambda_under_vi_tempers_the_prior_and_leaves_the_entropy_unscaled():
    # λ multiplies log p(w | mixture) in the ELBO, not log q: the optimal q is ∝ p(D | w) p(w)^λ,
    # precision XᵀX/s² + λp. A λ-scaled KL would give ∝ p(D | w)^(1/λ) p(w), precision XᵀX/(λs²) + p.
    # A strong prior (p = 100, against data precisions XᵀX/s² of 27 to 423) makes λ matter.
    prior_weight, prior_precision = 0.25, 100.0
    data, draws = _linear_fit(prior_weight, "full", prior_precision)
    mean, covariance, _ = linear.posterior(data, prior_weight, prior_precision)
    assert ((draws.mean(0) - mean).abs() / covariance.diagonal().sqrt()).max() < 0.2
    assert (torch.cov(draws.T) - covariance).norm() / covariance.norm() < 0.1
    x, eye = data.train_x, torch.eye(linear.D, dtype=data.train_x.dtype)
    untempered = linear.posterior(data, 1.0, prior_precision)[1]
    scaled_kl = torch.linalg.inv(x.T @ x / (prior_weight * linear.NOISE**2) + prior_precision * eye)
    for other in (untempered, scaled_kl):  # the alternatives are far outside the tolerance
        assert (other - covariance).norm() / covariance.norm() > 0.3


def test_the_map_loss_meaning_of_lambda_is_unchanged_by_vi():
    # A point guide's ELBO is still −log p(D | w) − λ log p(w | θ) − log p(θ): doubling λ
    # adds exactly one more −λ log p(w | θ).
    data, model = toy_dataset(), toy_model(prior_weight=0.5)
    state = fit_map(model, data, epochs=1, progress=False)
    doubled = SoftWeightSharingModel(model.network, prior=model.prior, likelihood=model.likelihood, prior_weight=1.0)
    x, y, n = data.train_x, data.train_y, len(data.train_x)
    with library_scope(), torch.no_grad():
        values = state.values
        traces = [pyro.poutine.trace(pyro.poutine.condition(m, data=values)).get_trace(x, y, data_size=n)
                  for m in (model, doubled)]
    mixture = model.mixtures(values)["mixture"]
    log_prior = sum(MixturePrior(mixture, event_shape=values[name].shape).log_prob(values[name])
                    for name in model.prior_sites)
    assert math.isclose(traces[1].log_prob_sum() - traces[0].log_prob_sum(), 0.5 * log_prior, rel_tol=1e-6)


def _elbo_estimates(local: bool, model, guide, x, y, n, repeats: int, particles: int):
    loss = vi_loss(num_particles=particles, local_reparameterization=local)
    with library_scope(), torch.random.fork_rng():
        torch.manual_seed(int(local))
        return torch.stack([loss(model, guide, x, y, data_size=n).detach() for _ in range(repeats)])


def test_local_reparameterization_leaves_the_expected_elbo_unchanged():
    data, model = toy_dataset(), toy_model()
    x, y, n = data.train_x, data.train_y, len(data.train_x)
    with library_scope():
        guide = vi_guide(model, init_scale=0.3)
        guide(x, y, data_size=n)
    sampled, local = (_elbo_estimates(flag, model, guide, x, y, n, repeats=40, particles=64) for flag in (False, True))
    # Within 4 standard errors of the difference of the two means (each from 40 × 64 draws)
    error = math.sqrt(sampled.var() / len(sampled) + local.var() / len(local))
    assert abs(sampled.mean() - local.mean()) < 4 * error
    assert error < 0.02 * abs(sampled.mean())  # the test has power: the ELBO is known to 2 %


def test_a_resumed_vi_fit_ends_exactly_where_an_uninterrupted_one_does():
    data = toy_dataset()
    options = dict(batch_size=20, learning_rates=RATES, num_particles=2, init_scale=0.05, seed=3, progress=False)
    whole = fit_vi(toy_model(), data, epochs=4, **options)
    first = fit_vi(toy_model(), data, epochs=2, **options)
    epochs_run = []
    counter = type("Counter", (Callback,), {"on_epoch": lambda self, state, record: epochs_run.append(state.epoch)})
    resumed = fit_vi(toy_model(), data, epochs=4, state_dict=first.state_dict(), callbacks=[counter()], **options)
    assert epochs_run == [3, 4]  # continued, not started again
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history]
    for name, value in whole.guide.state_dict().items():
        assert torch.equal(resumed.guide.state_dict()[name], value)


def test_vi_run_end_to_end_on_digits_saves_a_guide_to_draw_from_again(tmp_path):
    spec = load_spec(ROOT / "models/digits-vi.toml",
                     overrides=["inference.epochs=3", "inference.vi.epochs=2", "inference.vi.num_particles=2"])
    metrics = run(spec, out_dir=tmp_path, progress=False)
    assert metrics["method"] == "vi" and len(metrics["history"]) == 2 and len(metrics["map_history"]) == 3
    assert metrics["test_accuracy"] > 0.5
    assert metrics["metrics_at"] == "guide median"  # a point's metrics, not the predictive's
    fitted = load_checkpoint(tmp_path / "checkpoint.pt")
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["fit_state"]["guide"]
    restored = fitted.guide.state_dict()
    assert set(restored) == set(saved) and all(torch.equal(restored[k], v) for k, v in saved.items())
    draws = fitted.posterior_samples(num_draws=6, seed=0)
    assert draws.method == "vi" and (draws.n_chains, draws.n_draws) == (1, 6)
    weights = draws.samples["1.weight"][0]
    assert weights.shape[1:] == fitted.values["1.weight"].shape
    assert (weights.std(0) > 0).all()  # real draws, not the point repeated
    again = fitted.posterior_samples(num_draws=6, seed=0)
    assert all(torch.equal(again.samples[name], value) for name, value in draws.samples.items())
    # the draws centre on the saved median
    assert (weights.mean(0) - fitted.values["1.weight"]).abs().mean() < weights.std(0).mean()


def test_cli_method_flag_is_inference_method(tmp_path, capsys):
    from bayes_sws.cli import main

    status = main(["fit", str(ROOT / "models/digits.toml"), "--method", "vi", "--quiet", "--out", str(tmp_path),
                   "--set", "inference.epochs=1", "--set", "inference.vi.epochs=1"])
    assert status == 0
    metrics = (tmp_path / "metrics.json").read_text()
    assert '"method": "vi"' in metrics and '"map_history"' in metrics


def test_in_the_elbo_lambda_scales_the_models_weight_log_density_and_not_the_guides():
    data, model = toy_dataset(), toy_model(prior_weight=0.25)
    x, y, n = data.train_x, data.train_y, len(data.train_x)
    with library_scope(), torch.no_grad():
        guide = vi_guide(model)
        guide_trace = pyro.poutine.trace(guide).get_trace(x, y, data_size=n)
        model_trace = pyro.poutine.trace(pyro.poutine.replay(model, trace=guide_trace)).get_trace(x, y, data_size=n)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    for name in model.prior_sites:
        assert guide_trace.nodes[name]["scale"] == 1.0
    prior = model_trace.nodes["mixture.prior"]
    mixture = model.mixtures({name: site["value"] for name, site in guide_trace.iter_stochastic_nodes()})["mixture"]
    log_prior = sum(MixturePrior(mixture, event_shape=model_trace.nodes[name]["value"].shape).log_prob(
        model_trace.nodes[name]["value"]) for name in model.prior_sites)
    assert prior["scale"] == 0.25 and torch.allclose(prior["log_prob_sum"], 0.25 * log_prior)
    for name in ("mixture.precisions", "mixture.means"):
        assert model_trace.nodes[name]["scale"] == 1.0


@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_local_pre_activations_have_the_weight_sampling_mean_and_variance(layer):
    from bayes_sws.local_reparam import local_outputs

    torch.manual_seed(0)
    network = nn.Sequential(nn.Linear(5, 3)) if layer == "linear" else nn.Sequential(nn.Conv2d(2, 3, 3, padding=1))
    x = torch.randn(4, 5) if layer == "linear" else torch.randn(4, 2, 5, 5)
    shape = network[0].weight.shape
    posterior = {"0.weight": (torch.randn(shape), 0.1 + torch.rand(shape))}
    draws = 4000
    local = local_outputs(network, posterior, x, particles=torch.Size([draws]))
    location, scale = posterior["0.weight"]
    weights = location + scale * torch.randn(draws, *shape)
    sampled = torch.func.vmap(lambda w: torch.func.functional_call(network, {"0.weight": w}, (x,)))(weights)
    assert local.shape == sampled.shape == (draws, *network(x).shape)
    # means: within 5 standard errors; variances: within 15 % (about 7 standard errors of the ratio)
    standard_error = (sampled.var(0) / draws).sqrt()
    assert ((local.mean(0) - sampled.mean(0)).abs() < 5 * standard_error + 1e-6).all()
    assert torch.allclose(local.var(0), sampled.var(0), rtol=0.15)


@pytest.mark.parametrize("mixture_guide", ["full", "lowrank"])
def test_a_joint_mixture_guide_trains_at_the_slowest_mixture_rate_not_the_weights_rate(mixture_guide):
    from bayes_sws.fitting import start_fit

    data, model = toy_dataset(), toy_model()
    rates = LearningRates(weights=0.5, means=0.02, precisions=0.03, pi=0.04)
    guide = vi_guide(model, mixture_guide=mixture_guide)
    state = start_fit(model, guide, data, loss=vi_loss(), learning_rates=rates)
    rate_of = {id(p): group["lr"] for group in state.optimizer.param_groups for p in group["params"]}
    weights_part, mixture_part = guide[0], guide[1]
    assert {rate_of[id(p)] for p in weights_part.parameters()} == {0.5}
    assert {rate_of[id(p)] for p in mixture_part.parameters()} == {0.02}


def _digits_sized_model():
    """A 64-16-10 network (digits' input and classes), λ = 0.25, in float64: round-off far below the tolerances."""
    torch.manual_seed(0)
    network = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).double()
    model = SoftWeightSharingModel(network, prior=SoftWeightSharingPrior(n_components=4, init_means=(-0.5, 0.5)),
                                   likelihood=Categorical(), prior_weight=0.25)
    x = torch.randn(32, 64, dtype=torch.float64)
    return model, x, torch.randint(0, 10, (32,)), 500


def _loss_and_gradients(loss, model, guide, x, y, n, *, seed: int, local_posterior=None):
    parameters = [*guide.parameters(), *model.network.parameters()]
    for parameter in parameters:
        parameter.grad = None
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        with weight_posterior(local_posterior) if local_posterior else contextlib.nullcontext():
            value = loss(model, guide, x, y, data_size=n)
    value.backward()
    return value.detach(), [parameter.grad for parameter in parameters]


def _regression_model():
    """A 5-8-1 regression net, biases under the prior, one mixture per tensor, a learned noise scale."""
    torch.manual_seed(1)
    network = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    model = SoftWeightSharingModel(network, prior=SoftWeightSharingPrior(n_components=3, init_means=(-0.5, 0.5)),
                                   likelihood=Gaussian(), prior_weight=0.5, include_biases=True, shared=False)
    return model, torch.randn(20, 5, dtype=torch.float64), torch.randn(20, dtype=torch.float64), 100


def _assert_lean_elbo_is_trace_elbos(model, x, y, n, *, particles: int, local: bool, mixture_guide: str) -> None:
    # Same seed, same draws in the same order: the closed-form log q of the weights and the
    # untraced model run give Trace_ELBO's value and gradients, λ scaling the prior factor only.
    with library_scope():
        guide = vi_guide(model, init_scale=0.1, mixture_guide=mixture_guide)
        guide(x, y, data_size=n)
        assert mean_field_part(guide, model.prior_sites) is guide[0]
        lean = _loss_and_gradients(vi_loss(num_particles=particles, local_reparameterization=local),
                                   model, guide, x, y, n, seed=5)
        part = guide[0]
        posterior = {name: part._get_loc_and_scale(name) for name in model.prior_sites} if local else None
        elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
        reference = _loss_and_gradients(elbo.differentiable_loss, model, guide, x, y, n, seed=5,
                                        local_posterior=posterior)
        other_draws = _loss_and_gradients(vi_loss(num_particles=particles, local_reparameterization=local),
                                          model, guide, x, y, n, seed=6)
    torch.testing.assert_close(lean[0], reference[0], rtol=1e-12, atol=0)
    # the draws matter: another seed moves the loss by far more than the tolerance above
    assert abs(float(other_draws[0] - reference[0])) > 1e-6 * abs(float(reference[0]))
    compared = 0
    for mine, theirs in zip(lean[1], reference[1]):
        assert (mine is None) == (theirs is None)
        if theirs is not None:  # the prior sites' network tensors are replaced by draws: no gradient
            torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12 * float(theirs.abs().max()))
            compared += 1
    assert compared == len(list(guide.parameters())) + len(model.passthrough)


@pytest.mark.parametrize("mixture_guide", ["full", "lowrank", "diagonal"])
@pytest.mark.parametrize("local", [False, True], ids=["weights", "local"])
@pytest.mark.parametrize("particles", [1, 3])
def test_the_lean_elbo_equals_trace_elbos_in_value_and_every_gradient(particles, local, mixture_guide):
    _assert_lean_elbo_is_trace_elbos(*_digits_sized_model(), particles=particles, local=local,
                                     mixture_guide=mixture_guide)


@pytest.mark.parametrize("mixture_guide", ["full", "diagonal"])
def test_the_lean_elbo_equals_trace_elbos_with_per_layer_mixtures_biases_and_a_learned_noise_scale(mixture_guide):
    _assert_lean_elbo_is_trace_elbos(*_regression_model(), particles=2, local=False, mixture_guide=mixture_guide)


def test_a_guide_without_mean_field_weights_takes_trace_elbos_path():
    model, x, y, n = _digits_sized_model()
    with library_scope():
        guide = vi_guide(model, init_scale=0.1, weight_guide="full")
        guide(x, y, data_size=n)
        assert mean_field_part(guide, model.prior_sites) is None
        lean = _loss_and_gradients(vi_loss(num_particles=2), model, guide, x, y, n, seed=5)
        elbo = Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1)
        reference = _loss_and_gradients(elbo.differentiable_loss, model, guide, x, y, n, seed=5)
        with pytest.raises(ValueError, match="mean-field"):
            vi_loss(local_reparameterization=True)(model, guide, x, y, data_size=n)
    assert torch.equal(lean[0], reference[0])
    assert all(torch.equal(a, b) for a, b in zip(lean[1], reference[1]) if b is not None)


def test_pyros_own_svi_trains_every_guide_parameter_through_the_lean_elbo():
    # Outside library_scope the guide's parameters live in Pyro's global param store: SVI
    # finds them through the loss's parameter reads, the weights' locations and scales included.
    model, x, y, n = _digits_sized_model()
    guide = vi_guide(model, init_scale=0.1)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss=vi_loss(num_particles=2))
    svi.step(x, y, data_size=n)
    before = {name: value.detach().clone() for name, value in pyro.get_param_store().items()}
    assert any(name.endswith("locs.0.weight") for name in before) and any(name.endswith("scales.2.weight")
                                                                         for name in before)
    svi.step(x, y, data_size=n)
    after = pyro.get_param_store()
    assert all(not torch.equal(after[name], value) for name, value in before.items())


class _ScoreFunctionDraws(pyro.poutine.messenger.Messenger):
    """Draws the unconstrained latents of a guide under it without reparameterisation: Pyro's score-function path."""

    def _pyro_sample(self, msg) -> None:
        if msg["name"].endswith("_unconstrained"):
            normal = getattr(msg["fn"], "base_dist", msg["fn"])
            msg["fn"] = pyro.distributions.Normal(normal.loc, normal.scale).has_rsample_(False).to_event(
                len(msg["fn"].event_shape))


class _ScoreFunctionPart(AutoGuide):
    """A hand-written guide part: another part's sites, drawn by the score-function path."""

    def __init__(self, part: AutoGuide) -> None:
        super().__init__(part.model)
        self.part = part

    def forward(self, *args, **kwargs):
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        with _ScoreFunctionDraws():
            return self.part(*args, **kwargs)


def _guide_and_model_outside_the_lean_rule(case, model):
    """A model-guide pair the lean path cannot vouch for (built inside library_scope), and the guide to train."""
    guide = vi_guide(model, init_scale=0.1, mixture_guide="diagonal")
    if case == "function guide":
        return model, lambda *args, **kwargs: guide(*args, **kwargs), guide
    if case == "wrapped model":
        return pyro.poutine.scale(model, scale=0.5), guide, guide
    mixture = guide.pop(1)
    if case == "function part":  # an AutoCallable, which has no prototype trace
        guide.append(lambda *args, **kwargs: mixture(*args, **kwargs))
    else:
        guide.append(_ScoreFunctionPart(mixture))
    return model, guide, torch.nn.ModuleList([guide, mixture])


@pytest.mark.parametrize("case", ["function guide", "wrapped model", "function part", "score-function part"])
def test_a_guide_or_model_the_lean_elbo_does_not_know_gets_trace_elbos_value_and_gradients(case):
    # A callable guide or part, a model wrapped by a handler, a part with non-reparameterised draws
    # (whose gradient needs Trace_ELBO's score-function term): Trace_ELBO's loss, not an error or another gradient.
    model, x, y, n = _digits_sized_model()
    with library_scope():
        model_fn, guide, owner = _guide_and_model_outside_the_lean_rule(case, model)
        guide(x, y, data_size=n)
        results = []
        for loss in (vi_loss(), Trace_ELBO(max_plate_nesting=1).differentiable_loss):
            parameters = list(owner.parameters())
            for parameter in parameters:
                parameter.grad = None
            with torch.random.fork_rng():
                torch.manual_seed(5)
                value = loss(model_fn, guide, x, y, data_size=n)
            value.backward()
            results.append((value.detach(), [parameter.grad for parameter in parameters]))
    (lean, lean_grads), (reference, reference_grads) = results
    torch.testing.assert_close(lean, reference, rtol=1e-12, atol=0)
    for mine, theirs in zip(lean_grads, reference_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)


def test_a_site_drawn_by_two_guide_parts_is_trace_elbos_error_not_a_loss():
    model, x, y, n = _digits_sized_model()
    with library_scope():
        guide = vi_guide(model, init_scale=0.1, mixture_guide="diagonal")
        init = init_to_value(values=model.initial_values())
        guide.append(AutoNormal(InitMessenger(init)(model), init_loc_fn=init))  # every site again
        guide(x, y, data_size=n)
        with pytest.raises(RuntimeError, match="Multiple sample sites named"):
            vi_loss(num_particles=2)(model, guide, x, y, data_size=n)
