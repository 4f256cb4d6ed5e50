"""Figures are returned (and saved on request) without touching matplotlib's global state."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure

from bayes_sws.plots import plot_history, plot_weights
from bayes_sws.prior import GaussianMixture

ROOT = Path(__file__).resolve().parents[1]

# svg is a built-in non-interactive backend other than Agg, so an import that forces
# Agg (or any other backend) shows up as a change; importing pyplot would be global
# state too (a figure manager, the backend resolved).
IMPORT_AND_REPORT = """
import sys
import matplotlib
before = matplotlib.get_backend()
import bayes_sws.plots
print(before, matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
"""


def test_importing_the_package_keeps_the_users_backend_and_never_imports_pyplot():
    env = {**os.environ, "MPLBACKEND": "svg", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", IMPORT_AND_REPORT], capture_output=True, text=True,
                            check=True, env=env, cwd=ROOT)
    assert result.stdout.split() == ["svg", "svg", "False"]


def mixture():
    return GaussianMixture(torch.tensor([0.9, 0.05, 0.05]).log(), torch.tensor([0.0, -0.3, 0.3]),
                           torch.tensor([0.01, 0.05, 0.05]))


def history():
    return [{"epoch": epoch, "loss": 1.0 / epoch, "accuracy": 0.5 + 0.1 * epoch,
             "mixtures": {"mixture": {"mu": [0.0, -0.3 + 0.01 * epoch, 0.3], "pi": [0.9, 0.05, 0.05]}}}
            for epoch in range(1, 4)]


def test_plot_weights_returns_the_figure_and_saves_it_only_when_asked(tmp_path):
    weights = torch.randn(500, generator=torch.Generator().manual_seed(0)) * 0.1
    figure = plot_weights(weights, mixture(), title="weights")
    assert isinstance(figure, Figure) and figure.axes[0].get_title() == "weights"
    assert list(tmp_path.iterdir()) == []
    plot_weights(weights, mixture(), tmp_path / "weights.png")
    assert (tmp_path / "weights.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_plot_history_draws_three_panels_and_saves_in_the_suffixs_format(tmp_path, suffix):
    path = tmp_path / f"history{suffix}"
    figure = plot_history(history(), path, metric="accuracy", group="mixture")
    assert len(figure.axes) == 3 and len(figure.axes[2].lines) == 3
    assert path.stat().st_size > 0
    assert (path.read_bytes().startswith(b"\x89PNG")) == (suffix == ".png")


def test_reliability_and_entropy_figures_are_written_without_pyplot(tmp_path):
    from bayes_sws.metrics import calibration
    from bayes_sws.plots import plot_entropy_histograms, plot_reliability

    probabilities = torch.softmax(torch.randn(200, 4, generator=torch.Generator().manual_seed(0)), -1)
    labels = torch.randint(0, 4, (200,), generator=torch.Generator().manual_seed(1))
    figure = plot_reliability(calibration(probabilities, labels), tmp_path / "reliability.png")
    assert isinstance(figure, Figure)
    entropies = {"test": torch.rand(50), "noise": torch.full((30,), 4.0).log()}  # exactly log C included
    figure = plot_entropy_histograms(entropies, tmp_path / "uncertainty.png", n_classes=4)
    assert isinstance(figure, Figure)
    patches = [p for p in figure.axes[0].patches]
    assert len(patches) == 2  # one filled histogram per set
    for name in ("reliability.png", "uncertainty.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "matplotlib.pyplot" not in sys.modules or not __import__("matplotlib.pyplot").pyplot.get_fignums()
