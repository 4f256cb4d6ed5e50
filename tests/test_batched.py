"""The model with weights that carry leading particle dimensions, and under a traced potential.

Vectorised ELBO particles and ``Predictive(parallel=True)`` sample every site in an
outer plate, so the weights reach the network as ``(S, 1, *shape)``; NUTS with
``jit_compile=True`` traces the potential energy with ``torch.jit.trace``. Each
test compares against the same computation done one draw at a time, or untraced.
"""

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal, init_to_value
from pyro.infer.mcmc.util import initialize_model
from pyro.poutine.util import prune_subsample_sites
from torch import nn

from bayes_sws.model import Categorical, Gaussian, SoftWeightSharingModel
from bayes_sws.prior import Hyperpriors, MixturePrior, SoftWeightSharingPrior

F64 = torch.float64
PROPER = Hyperpriors(dirichlet=2.0, means_scale=1.0, precision_gamma=(2.0, 0.5), zero_proportion_beta=(2.0, 2.0))


@pytest.fixture(autouse=True)
def _fresh_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def classifier(*, shared=True):
    """A 4-5-3 tanh classifier with proper hyperpriors and a learned zero component, and a batch of 6."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    prior = SoftWeightSharingPrior(n_components=3, init_scale=0.5, hyperpriors=PROPER)
    model = SoftWeightSharingModel(net, prior=prior, likelihood=Categorical(), prior_weight=0.5, shared=shared)
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(6, 4, generator=g, dtype=F64), torch.randint(3, (6,), generator=g)


def auto_normal(model, *args):
    guide = AutoNormal(model, init_loc_fn=init_to_value(values=model.initial_values()))
    guide(*args)
    return guide


def latent_shapes(model, *args):
    """Each latent site's value shape in one unbatched run of the model."""
    trace = prune_subsample_sites(poutine.trace(model).get_trace(*args))
    return {name: trace.nodes[name]["value"].shape for name in trace.stochastic_nodes}


# --------------------------------------------------------------------------- vectorised ELBO


@pytest.mark.parametrize("shared", [True, False])
def test_vectorised_elbo_particles_equal_the_same_draws_taken_one_at_a_time(shared):
    model, x, y = classifier(shared=shared)
    guide = auto_normal(model, x, y)
    with pyro.plate("draws", 4, dim=-2):
        draws = poutine.trace(guide).get_trace(x, y)
    noise = {name: site["value"].detach().requires_grad_()
             for name, site in draws.nodes.items() if site.get("infer", {}).get("is_auxiliary")}
    assert all(value.shape[:2] == (4, 1) for value in noise.values())

    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    loss = elbo.differentiable_loss(model, poutine.condition(guide, data=noise), x, y)
    grads = torch.autograd.grad(loss, list(noise.values()))

    one = Trace_ELBO(num_particles=1, max_plate_nesting=1)
    losses, particle_grads = [], []
    for s in range(4):
        draw = {name: value[s, 0].detach().requires_grad_() for name, value in noise.items()}
        losses.append(one.differentiable_loss(model, poutine.condition(guide, data=draw), x, y))
        particle_grads.append(torch.autograd.grad(losses[-1], list(draw.values())))
    torch.testing.assert_close(loss, torch.stack(losses).mean(), rtol=1e-12, atol=0)
    for index, grad in enumerate(grads):
        expected = torch.stack([g[index] for g in particle_grads]).unsqueeze(1) / 4
        torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_svi_with_vectorised_particles_and_an_auto_normal_guide_trains():
    model, x, y = classifier()
    guide = auto_normal(model, x, y)
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
    losses = [svi.step(x, y) for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses)))
    # Many particles estimate the same expectation vectorised or not (standard error ≪ 1 % here).
    pyro.set_rng_seed(2)
    vectorised = Trace_ELBO(num_particles=400, vectorize_particles=True).loss(model, guide, x, y)
    sequential = Trace_ELBO(num_particles=400).loss(model, guide, x, y)
    assert vectorised == pytest.approx(sequential, rel=0.02)


def test_vectorised_elbo_particles_of_a_gaussian_regression_model():
    model, x, y = regression()
    loss = Trace_ELBO(num_particles=4, vectorize_particles=True).loss(model, auto_normal(model, x, y), x, y)
    assert torch.isfinite(torch.tensor(loss))


# --------------------------------------------------------------------------- parallel Predictive


def test_parallel_predictive_runs_the_network_once_per_draw_and_scores_each_draw_with_its_own_mixture():
    model, x, y = classifier()
    guide = auto_normal(model, x, y)
    shapes = latent_shapes(model, x, y)
    pyro.set_rng_seed(3)
    samples = Predictive(model, guide=guide, num_samples=5, parallel=True,
                         return_sites=(*shapes, "y", "_RETURN"))(x)
    assert samples["y"].shape == (5, 6)
    assert samples["_RETURN"].shape == (5, 6, 3) and torch.isfinite(samples["_RETURN"]).all()

    # The same draws as a vectorised ELBO would pass them: (5, 1, *shape).
    draws = {name: samples[name].reshape(5, 1, *shape) for name, shape in shapes.items()}
    with pyro.plate("draws", 5, dim=-2):
        trace = poutine.trace(poutine.condition(model, data=draws)).get_trace(x)
    trace.compute_log_prob()
    for s in range(5):
        draw = {name: value[s, 0] for name, value in draws.items()}
        outputs = poutine.condition(model, data=draw)(x)
        torch.testing.assert_close(samples["_RETURN"][s], outputs, rtol=1e-12, atol=1e-12)
        mixture = model.mixtures(draw)["mixture"]
        expected = sum(MixturePrior(mixture, event_shape=draw[name].shape).log_prob(draw[name])
                       for name in model.prior_sites)
        torch.testing.assert_close(trace.nodes["mixture.prior"]["unscaled_log_prob"][s, 0], expected,
                                   rtol=1e-12, atol=0)
    assert trace.nodes["y"]["log_prob"].shape == (5, 6)


def test_mixtures_of_batched_site_values_are_batched():
    model, x, _ = classifier()
    values = {name: value.expand(3, 1, *value.shape) for name, value in model.initial_values().items()}
    mixture = model.mixtures(values)["mixture"]
    assert all(t.shape == (3, 1, model.prior.n_components) for t in mixture)


# --------------------------------------------------------------------------- NUTS, traced


def regression():
    """A 3-2-1 tanh regression net with fixed noise and proper hyperpriors, and 8 points.

    Biases are under the prior too: a pass-through ``pyro.param`` becomes a constant of
    the trace that requires grad again once Pyro has traced, and the traced function
    then fails on its next call ("Unsupported value kind: Tensor").
    """
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1)).double()
    prior = SoftWeightSharingPrior(n_components=3, init_scale=0.5, hyperpriors=PROPER)
    model = SoftWeightSharingModel(net, prior=prior, likelihood=Gaussian(noise_scale=0.3), include_biases=True)
    g = torch.Generator().manual_seed(5)
    return model, torch.randn(8, 3, generator=g, dtype=F64), torch.randn(8, generator=g, dtype=F64)


def test_traced_potential_energy_and_its_gradient_equal_the_untraced_ones_at_two_points(kernel_backend):
    model, x, y = regression()
    init = init_to_value(values=model.initial_values())
    start, traced, _, _ = initialize_model(model, model_args=(x, y), jit_compile=True, skip_jit_warnings=True,
                                           init_strategy=init)
    _, plain, _, _ = initialize_model(model, model_args=(x, y), init_strategy=init)
    g = torch.Generator().manual_seed(6)
    moved = {name: value + 0.3 * torch.randn(value.shape, generator=g, dtype=F64) for name, value in start.items()}
    for point in (start, moved, start):
        values = {name: value.detach().requires_grad_() for name, value in point.items()}
        energy = traced(values)
        grads = torch.autograd.grad(energy, list(values.values()))
        expected = plain(values)
        expected_grads = torch.autograd.grad(expected, list(values.values()))
        torch.testing.assert_close(energy, expected, rtol=1e-12, atol=0)
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_nuts_with_a_traced_potential_samples():
    model, x, y = regression()
    kernel = NUTS(model, jit_compile=True, ignore_jit_warnings=True,
                  init_strategy=init_to_value(values=model.initial_values()))
    mcmc = MCMC(kernel, num_samples=5, warmup_steps=5, disable_progbar=True)
    mcmc.run(x, y)
    samples = mcmc.get_samples()
    assert samples["0.weight"].shape == (5, 2, 3)
    assert all(torch.isfinite(value).all() for value in samples.values())
