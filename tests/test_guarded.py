"""Guarded training: a non-finite loss or gradient stops the fit, names the step and a likely cause."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from bayes_sws import experiment
from bayes_sws.cli import main
from bayes_sws.errors import FitError
from bayes_sws.fitting import fit, start_fit
from bayes_sws.inference import map_guide, map_loss
from bayes_sws.prior import SoftWeightSharingPrior
from bayes_sws.storage import partial_dir
from tests.test_inference import FAST_RATES, toy_dataset, toy_model

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "models" / "digits.toml")


def poisoned(at_call: int, poison):
    """``map_loss``, with ``poison(loss, guide)`` added on its ``at_call``-th call."""
    calls = [0]

    def loss(model, guide, *args, **kwargs):
        calls[0] += 1
        value = map_loss(model, guide, *args, **kwargs)
        return value + poison(guide) if calls[0] == at_call else value

    return loss


def nan_value(guide):
    return torch.tensor(math.nan)


def nan_gradient(guide):
    """Zero in value, NaN in gradient: d/dp sqrt(|p - p|) is infinite, times zero."""
    parameter = next(guide.parameters())
    return 0.0 * (parameter - parameter.detach()).abs().sqrt().sum()


def inf_gradient(guide):
    """Zero in value, +inf in gradient: d/dp sqrt(p - p) at 0."""
    parameter = next(guide.parameters())
    return (parameter - parameter.detach()).sqrt().sum()


def run_toy(loss, prior=None):
    data = toy_dataset()
    model = toy_model(prior=prior)
    state = start_fit(model, map_guide(model), data, loss=loss, learning_rates=FAST_RATES, batch_size=20, seed=0)
    before = {name: p.detach().clone() for name, p in state.guide.named_parameters()}
    with pytest.raises(FitError) as raised:
        fit(state, data, epochs=3, progress=False)
    return state, before, str(raised.value)


@pytest.mark.parametrize("poison, what", [(nan_value, "the loss became nan"),
                                          (nan_gradient, "a gradient became nan"),
                                          (inf_gradient, "a gradient became inf")])
def test_a_non_finite_loss_or_gradient_stops_before_the_step_naming_epoch_and_step(poison, what):
    # 1 call at start_fit, then 3 steps per epoch: call 6 is epoch 2, step 5
    state, _, message = run_toy(poisoned(6, poison))
    assert message.startswith(f"{what} at epoch 2, step 5:") and "weights=0.05) or the prior weight" in message
    assert (state.epoch, state.step) == (1, 4)
    assert all(bool(torch.isfinite(p).all()) for p in state.guide.parameters())  # the bad step was not taken


def test_a_collapsed_mixture_component_is_named_as_the_likely_cause():
    prior = SoftWeightSharingPrior(n_components=4, init_means=(-0.5, 0.5), init_scale=1e-6)
    _, _, message = run_toy(poisoned(3, nan_value), prior=prior)
    assert re.search(r"has a collapsed component \(σ = 1(\.\d+)?e-06\)", message) and "precision_gamma" in message


def test_a_diverging_run_exits_2_in_one_line_and_keeps_its_last_good_epoch(tmp_path, monkeypatch, capsys):
    from bayes_sws import fitting

    original, calls = fitting._checked_loss, [0]

    def diverge_in_epoch_3(state, loss, parameters):
        calls[0] += 1
        return original(state, loss * math.inf if calls[0] == 2 * 6 + 2 else loss, parameters)

    monkeypatch.setattr(fitting, "_checked_loss", diverge_in_epoch_3)
    out = tmp_path / "run"
    status = main(["fit", DIGITS, "--out", str(out), "--quiet", "--set=network.hidden=[8]",
                   "--set=inference.batch_size=256", "--set=inference.epochs=4"])
    error = capsys.readouterr().err
    assert status == 2 and error.count("\n") == 1 and "Traceback" not in error
    assert "the loss became inf at epoch 3, step 14" in error and "state.pt" in error
    state = torch.load(partial_dir(out) / "state.pt", weights_only=True)
    assert state["fit_state"]["epoch"] == 2 and not out.exists()
