"""Fits as ArviZ InferenceData: groups, dims, coords, summaries, PSIS-LOO, plots, NetCDF."""

import matplotlib
import numpy as np
import pytest
import torch
from torch import nn

from bayes_sws import Categorical, SoftWeightSharingModel, SoftWeightSharingPrior
from bayes_sws.diagnostics import (
    load_inference_data,
    loo,
    plot_mixture_forest,
    plot_trace,
    plot_weight_posteriors,
    save_inference_data,
    summary,
    to_inference_data,
    weight_dims,
)
from bayes_sws.errors import BayesSWSError
from bayes_sws.inference import PosteriorSamples
from bayes_sws.predictive import predict

CHAINS, DRAWS, N = 2, 12, 12


def _model(*, shared: bool = True) -> SoftWeightSharingModel:
    torch.manual_seed(0)
    network = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    return SoftWeightSharingModel(network, prior=SoftWeightSharingPrior(n_components=4, init_scale=0.2),
                                  likelihood=Categorical(), shared=shared)


def _posterior(model: SoftWeightSharingModel, chains: int = CHAINS, draws: int = DRAWS) -> PosteriorSamples:
    generator = torch.Generator().manual_seed(0)
    values = model.initial_values()
    samples = {}
    for name, value in values.items():
        noise = torch.randn((chains, draws, *value.shape), generator=generator)
        # positive sites (precisions, proportions) move multiplicatively, and proportions stay normalised
        samples[name] = value * (1 + 0.05 * noise).abs() if value.min() > 0 else value + 0.1 * noise
        if name.endswith(".pi"):
            samples[name] = samples[name] / samples[name].sum(-1, keepdim=True)
    stats = {"diverging": torch.zeros(chains, draws, dtype=torch.bool), "energy": torch.randn(chains, draws)}
    return PosteriorSamples("nuts", samples, stats)


@pytest.fixture(scope="module")
def fitted():
    model = _model()
    posterior = _posterior(model)
    x, y = torch.randn(N, 4, generator=torch.Generator().manual_seed(2)), torch.arange(N) % 3
    predictive = predict(model, posterior.flat(), x, y, seed=0)
    return model, posterior, y, to_inference_data(model, posterior, predictive=predictive, observed=y)


def test_weight_dims_are_named_after_the_layer():
    assert weight_dims("layers.0.weight", 2) == ("layers_0_out", "layers_0_in")
    assert weight_dims("conv1.weight", 4) == ("conv1_out", "conv1_in", "conv1_kh", "conv1_kw")
    assert weight_dims("conv1.bias", 1) == ("conv1_out",)
    assert weight_dims("1.weight", 2) == ("layer_1_out", "layer_1_in")


def test_inference_data_has_every_group_with_named_dims_and_coords(fitted):
    model, posterior, y, idata = fitted
    assert set(idata.groups()) == {"posterior", "sample_stats", "posterior_predictive", "log_likelihood",
                                   "observed_data"}
    for name in ("pi", "mu", "sigma"):
        assert idata.posterior[name].dims == ("chain", "draw", "component")
    assert idata.posterior["component"].values.tolist() == [0, 1, 2, 3]
    assert idata.posterior["0.weight"].dims == ("chain", "draw", "layer_0_out", "layer_0_in")
    assert idata.posterior["2.weight"].shape == (CHAINS, DRAWS, 3, 5)
    assert idata.posterior["layer_0_in"].values.tolist() == [0, 1, 2, 3]
    assert not any(name.startswith("mixture.") for name in idata.posterior.data_vars)
    assert idata.sample_stats["diverging"].shape == (CHAINS, DRAWS)
    for group in ("posterior_predictive", "log_likelihood"):
        assert idata[group]["y"].dims == ("chain", "draw", "obs") and idata[group]["y"].shape == (CHAINS, DRAWS, N)
    assert idata.observed_data["y"].values.tolist() == y.tolist()
    assert idata.attrs["inference_method"] == "nuts"


def test_mixture_variables_are_the_mixture_of_each_draw(fitted):
    model, posterior, _, idata = fitted
    chain, draw = 1, 5
    mixture = model.mixtures({name: value[chain, draw] for name, value in posterior.samples.items()})["mixture"]
    assert np.allclose(idata.posterior["pi"].values[chain, draw], mixture.proportions.numpy())
    assert np.allclose(idata.posterior["mu"].values[chain, draw], mixture.means.numpy())
    assert np.allclose(idata.posterior["sigma"].values[chain, draw], mixture.scales.numpy())
    assert np.allclose(idata.posterior["0.weight"].values[chain, draw], posterior.samples["0.weight"][chain, draw])
    # the means move between draws: the posterior is not one point repeated
    assert idata.posterior["mu"].values[..., 1].std() > 0


def test_log_likelihood_is_per_draw_per_observation(fitted):
    model, posterior, y, idata = fitted
    draws = posterior.flat()
    x = torch.randn(N, 4, generator=torch.Generator().manual_seed(2))
    s = DRAWS + 3  # chain 1, draw 3
    logits = torch.func.functional_call(model.network, {k: draws[k][s] for k in model.prior_sites}, (x,))
    expected = torch.distributions.Categorical(logits=logits).log_prob(y).detach()
    assert np.allclose(idata.log_likelihood["y"].values[1, 3], expected.numpy(), atol=1e-5)


def test_summary_has_ess_and_rhat_for_the_mixture(fitted):
    table = summary(fitted[3])
    assert {"mean", "sd", "ess_bulk", "ess_tail", "r_hat"} <= set(table.columns)
    assert {"pi[0]", "mu[3]", "sigma[2]"} <= set(table.index)
    assert not any(index.startswith("0.weight") for index in table.index)
    assert table.loc["mu[1]", "ess_bulk"] > 1


def test_loo_needs_draws_and_a_log_likelihood(fitted):
    model, posterior, _, idata = fitted
    result = loo(idata)
    assert result.n_samples == CHAINS * DRAWS and result.n_data_points == N
    assert np.isfinite(result.elpd_loo) and np.isfinite(result.pareto_k).all()
    with pytest.raises(BayesSWSError, match="log_likelihood"):
        loo(to_inference_data(model, posterior))
    point = PosteriorSamples("map", {k: v[:1, :1] for k, v in posterior.samples.items()})
    x = torch.randn(3, 4)
    single = to_inference_data(model, point, predictive=predict(model, point.flat(), x, torch.zeros(3).long()))
    with pytest.raises(BayesSWSError, match="MAP"):
        loo(single)
    few = PosteriorSamples("vi", {k: v[:1, :20] for k, v in posterior.samples.items()})
    with pytest.raises(BayesSWSError, match="at least 21 draws"):
        loo(to_inference_data(model, few, predictive=predict(model, few.flat(), x, torch.zeros(3).long())))


def test_netcdf_round_trip_preserves_groups_values_dims_and_coords(fitted, tmp_path):
    idata = fitted[3]
    save_inference_data(idata, tmp_path / "idata.nc")
    back = load_inference_data(tmp_path / "idata.nc")
    assert set(back.groups()) == set(idata.groups())
    for group in idata.groups():
        assert set(back[group].data_vars) == set(idata[group].data_vars)
        for name, variable in idata[group].data_vars.items():
            assert back[group][name].dims == variable.dims
            np.testing.assert_array_equal(back[group][name].values, variable.values)
    assert back.posterior["layer_2_out"].values.tolist() == [0, 1, 2]
    assert back.attrs["inference_method"] == "nuts"
    # loaded into memory: the file can be replaced (here by another fit) under the loaded copy
    save_inference_data(to_inference_data(fitted[0], _posterior(fitted[0], chains=1, draws=2)), tmp_path / "idata.nc")
    np.testing.assert_array_equal(back.posterior["mu"].values, idata.posterior["mu"].values)
    with pytest.raises(BayesSWSError, match="not found"):
        load_inference_data(tmp_path / "missing.nc")


def test_large_networks_keep_a_leading_block_of_each_weight():
    model = _model()
    idata = to_inference_data(model, _posterior(model), max_weights=10, weights_per_dim=2)
    assert idata.posterior["0.weight"].shape == (CHAINS, DRAWS, 2, 2)
    assert idata.posterior["layer_2_in"].values.tolist() == [0, 1]


def test_one_mixture_per_layer_gets_a_group_dimension():
    model = _model(shared=False)
    idata = to_inference_data(model, _posterior(model))
    assert idata.posterior["pi"].dims == ("chain", "draw", "group", "component")
    assert idata.posterior["group"].values.tolist() == ["mixture.0.weight", "mixture.2.weight"]
    assert np.allclose(idata.posterior["pi"].values.sum(-1), 1.0)


def test_plots_are_written_closed_and_leave_the_backend_alone(fitted, tmp_path):
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    idata = fitted[3]
    plot_trace(idata, tmp_path / "trace.png")
    plot_mixture_forest(idata, tmp_path / "forest.png")
    plot_weight_posteriors(idata, tmp_path / "weights.png", n_weights=3)
    for name in ("trace.png", "forest.png", "weights.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plt.get_fignums() == []
    assert matplotlib.get_backend() == backend
    with pytest.raises(BayesSWSError, match="no variable"):
        plot_weight_posteriors(idata, site="9.weight")


def test_importing_the_package_does_not_import_arviz():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = "import sys, bayes_sws; print('arviz' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(root)}, cwd=root)
    assert result.stdout.split() == ["False"]


def test_summaries_and_plots_leave_warnings_filters_and_arviz_logging_as_they_were(fitted, tmp_path):
    import logging
    import warnings

    import arviz

    logger = getattr(arviz, "_log", logging.getLogger("arviz"))
    filters, level = list(warnings.filters), logger.level
    summary(fitted[3])
    plot_trace(fitted[3], tmp_path / "trace.png")
    assert warnings.filters == filters and logger.level == level
