"""Tests of the variational half: guide draws, VI fits, local reparameterisation, what λ means."""

from pathlib import Path

import pyro
import pytest
import torch

from bayes_sws.experiment import load_checkpoint, run
from bayes_sws.inference import fit_map, sample_guide
from bayes_sws.spec import load_spec
from test_inference import toy_dataset, toy_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


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
    assert set(draws.samples) == set(fitted.values)
    for name, value in fitted.values.items():
        assert torch.equal(draws.samples[name][0, 0], value)
