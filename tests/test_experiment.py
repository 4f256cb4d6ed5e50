"""Tests of bayes_sws.experiment: models built from specifications."""

import pyro
import pytest
import torch
from pyro.infer import MCMC, NUTS, Predictive

from bayes_sws.experiment import build_model
from bayes_sws.inference import map_guide
from bayes_sws.fitting import library_scope
from bayes_sws.spec import parse_spec

PROPER = {"dirichlet": 2.0, "means_scale": 1.0, "precision_gamma": [2.0, 0.1], "zero_proportion_beta": [2.0, 2.0]}


def regression_model(**likelihood):
    spec = parse_spec({"name": "tiny", "network": {"hidden": [3], "activation": "tanh"},
                       "prior": {"n_components": 3, "hyperpriors": PROPER}, "likelihood": likelihood})
    return build_model(spec, input_shape=(2,), task="regression", n_outputs=1)


def test_a_spec_built_regression_model_has_a_proper_noise_prior_so_predictive_and_nuts_run():
    model = regression_model(noise_prior_scale=0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 2, generator=g)
    y = torch.sin(x[:, 0]) + 0.1 * torch.randn(20, generator=g)
    prior_draws = Predictive(model, num_samples=4)(x)  # samples every site from its prior
    assert prior_draws["noise_scale"].numel() == 4 and bool((prior_draws["noise_scale"] > 0).all())
    assert prior_draws["y"].shape == (4, 20)
    with library_scope():
        guide = map_guide(model)
        posterior_draws = Predictive(model, guide=guide, num_samples=3)(x)
    assert posterior_draws["y"].shape == (3, 20)
    pyro.set_rng_seed(1)
    mcmc = MCMC(NUTS(model), num_samples=5, warmup_steps=5, disable_progbar=True)
    mcmc.run(x, y)
    samples = mcmc.get_samples()
    assert samples["noise_scale"].shape == (5,) and bool(torch.isfinite(samples[model.prior_sites[0]]).all())


def test_a_fixed_noise_scale_from_the_spec_is_not_a_latent_site():
    model = regression_model(noise_scale=0.2)
    assert "noise_scale" not in model.initial_values()
    x = torch.randn(5, 2)
    trace = pyro.poutine.trace(model).get_trace(x)
    assert torch.all(trace.nodes["y"]["fn"].scale == 0.2)


def test_a_runs_kernel_choice_does_not_outlive_the_run(tmp_path, monkeypatch):
    from bayes_sws import experiment, kernels
    from bayes_sws.spec import load_spec

    seen = []

    def record_and_stop(*args, **kwargs):
        seen.append(kernels.current_backend())
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "_fit", record_and_stop)
    with pytest.raises(KeyboardInterrupt):
        experiment.run(load_spec("models/digits.toml", overrides=["inference.kernels=torch"]),
                       out_dir=tmp_path / "run")
    assert seen == ["torch"]
    assert kernels.current_backend() == "auto"


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path(__import__('os').environ['MARKER']).write_text('ran')",))


def test_a_checkpoint_holding_pickled_objects_is_refused_without_running_them(tmp_path, monkeypatch):
    import pytest

    from bayes_sws.errors import BayesSWSError
    from bayes_sws.experiment import load_checkpoint

    marker = tmp_path / "marker"
    monkeypatch.setenv("MARKER", str(marker))
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": 2, "payload": _RunsCodeWhenUnpickled()}, path)
    with pytest.raises(BayesSWSError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()
