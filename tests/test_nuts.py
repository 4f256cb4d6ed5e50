"""Tests of NUTS on the one model function: the analytic linear-regression posterior, R-hat,
sampler statistics, refusals, and a NUTS run's checkpoint."""

from pathlib import Path

import pytest
import torch
from pyro.ops.stats import split_gelman_rubin
from torch import nn

import bayes_linear as linear
from bayes_sws.errors import BayesSWSError
from bayes_sws.experiment import load_checkpoint, run
from bayes_sws.inference import NUTS_MAX_WEIGHTS, fit_nuts
from bayes_sws.model import Categorical, SoftWeightSharingModel
from bayes_sws.prior import SoftWeightSharingPrior
from bayes_sws.spec import load_spec
from test_inference import toy_dataset, toy_model

ROOT = Path(__file__).resolve().parents[1]
CHAINS, DRAWS = 2, 150


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def linear_nuts():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    data, model = linear.dataset(), linear.model()
    mean, _, _ = linear.posterior(data)
    # started off the mode, to see the chains find it
    samples = fit_nuts(model, data, num_chains=CHAINS, warmup_steps=80, num_samples=DRAWS,
                       init_values={"weight": (mean + 0.3)[None]}, seed=0, progress=False)
    torch.set_num_threads(threads)
    return data, samples


def test_nuts_recovers_the_analytic_posterior_mean_and_covariance(linear_nuts):
    data, samples = linear_nuts
    mean, covariance, _ = linear.posterior(data)
    draws = linear.weight_draws(samples)
    # 300 draws, effective sample size about 250: Monte Carlo error about 0.065 sd on the
    # means and 9 % on the variances; the tolerances are three to four of those.
    assert ((draws.mean(0) - mean).abs() / covariance.diagonal().sqrt()).max() < 0.25
    assert (torch.cov(draws.T) - covariance).norm() / covariance.norm() < 0.25


def test_nuts_chains_mix_split_rhat_below_1_05_for_the_mixture_and_weights(linear_nuts):
    _, samples = linear_nuts
    for name in ("mixture.precisions", "weight"):
        rhat = split_gelman_rubin(samples.samples[name].reshape(CHAINS, DRAWS, -1), chain_dim=0, sample_dim=1)
        assert (rhat < 1.05).all(), (name, rhat)


def test_nuts_reports_its_sampler_statistics_per_draw(linear_nuts):
    _, samples = linear_nuts
    assert samples.method == "nuts" and (samples.n_chains, samples.n_draws) == (CHAINS, DRAWS)
    stats = samples.sample_stats
    assert set(stats) == {"diverging", "potential_energy", "step_size", "acceptance_rate"}
    assert all(value.shape == (CHAINS, DRAWS) for value in stats.values())
    assert stats["diverging"].dtype == torch.bool and not stats["diverging"].any()
    assert ((stats["acceptance_rate"] >= 0) & (stats["acceptance_rate"] <= 1 + 1e-9)).all()
    assert 0.6 < stats["acceptance_rate"].mean() < 1  # adapted towards the 0.8 target
    # step size is fixed after warm-up, one per chain
    assert (stats["step_size"] == stats["step_size"][:, :1]).all()
    assert stats["potential_energy"].isfinite().all() and stats["potential_energy"].std() > 0


def test_nuts_refuses_networks_above_its_weight_limit_and_flat_hyperpriors():
    data = toy_dataset()
    side = int(NUTS_MAX_WEIGHTS ** 0.5) + 1
    big = SoftWeightSharingModel(nn.Sequential(nn.Linear(4, side), nn.Linear(side, side), nn.Linear(side, 3)),
                                 prior=SoftWeightSharingPrior(n_components=2), likelihood=Categorical())
    assert big.n_weights > NUTS_MAX_WEIGHTS
    with pytest.raises(BayesSWSError, match=f"at most {NUTS_MAX_WEIGHTS}"):
        fit_nuts(big, data, progress=False)
    with pytest.raises(BayesSWSError, match="proper priors.*mixture.means"):
        fit_nuts(toy_model(), data, progress=False)  # toy_model's hyperpriors are flat


def test_nuts_run_end_to_end_saves_its_chains_in_the_checkpoint(tmp_path):
    spec = load_spec(ROOT / "models/sunspots-nuts.toml",
                     overrides=["inference.epochs=2", "inference.nuts.warmup=4", "inference.nuts.draws=5",
                                "inference.nuts.max_tree_depth=3"])
    metrics = run(spec, out_dir=tmp_path, progress=False)
    assert metrics["method"] == "nuts" and metrics["nuts"]["chains"] == 2 and metrics["nuts"]["draws"] == 5
    assert metrics["metrics_at"] == "posterior mean"  # a point's metrics, not the predictive's
    fitted = load_checkpoint(tmp_path / "checkpoint.pt")
    draws = fitted.posterior_samples()
    assert draws.method == "nuts" and (draws.n_chains, draws.n_draws) == (2, 5)
    assert set(draws.samples) == set(fitted.values)
    assert draws.sample_stats["diverging"].shape == (2, 5)
    for name, value in fitted.values.items():  # the saved point is the mean of the draws
        assert torch.allclose(draws.samples[name].mean((0, 1)), value)


@pytest.mark.parametrize("override", ["network.hidden=[64]", "prior.weight=0"])
def test_a_nuts_run_refuses_a_too_large_or_improper_model_before_its_map_fit(tmp_path, monkeypatch, override):
    import bayes_sws.experiment as experiment

    def map_fit_not_expected(*args, **kwargs):
        raise AssertionError("the MAP fit ran before NUTS refused the model")

    monkeypatch.setattr(experiment, "fit_map", map_fit_not_expected)
    spec = load_spec(ROOT / "models/digits-nuts.toml", overrides=[override])
    with pytest.raises(BayesSWSError, match="at most|proper priors"):
        run(spec, out_dir=tmp_path, progress=False)
    assert not any(tmp_path.iterdir())
