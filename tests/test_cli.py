"""The command line and end-to-end runs: artefacts, reproducibility, bad input."""

from __future__ import annotations

import gzip
import json
import math
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bayes_sws as sws
from bayes_sws.cli import main

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "models" / "digits.toml")


def _fit(tmp_path: Path, *overrides: str, name: str = "run") -> tuple[int, Path]:
    out = tmp_path / name
    arguments = ["fit", DIGITS, "--out", str(out), "--quiet"]
    for override in overrides:
        arguments += ["--set", override]
    return main(arguments), out


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> Path:
    """The README's main job: the digits default, fitted once for the tests below."""
    status, out = _fit(tmp_path_factory.mktemp("default"))
    assert status == 0
    return out


def test_default_run_writes_metrics_checkpoint_and_figures(default_run: Path) -> None:
    for name in ("metrics.json", "checkpoint.pt", "weights.png", "history.png"):
        assert (default_run / name).stat().st_size > 0
    assert (default_run / "weights.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((default_run / "metrics.json").read_text())
    for key in ("model", "method", "epochs", "seconds", "train_loss", "test_accuracy", "test_nll",
                "n_weights", "mixture", "history"):
        assert key in metrics
    assert metrics["n_weights"] == 64 * 64 + 64 * 10
    assert set(metrics["mixture"]) == {"pi", "mu", "sigma"}
    assert math.isclose(sum(metrics["mixture"]["pi"]), 1.0, rel_tol=1e-5)
    assert len(metrics["history"]) == metrics["epochs"]
    assert {"loss", "test_accuracy", "test_nll", "mixtures"} <= set(metrics["history"][0])


def test_digits_default_reaches_93_percent_test_accuracy(default_run: Path) -> None:
    metrics = json.loads((default_run / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.93


def _per_weight_gain_over_one_gaussian(weights: torch.Tensor, mixture: sws.GaussianMixture) -> float:
    """Mean log-density of the weights under the mixture minus under the best single Gaussian."""
    weights = weights.double()
    mixture = sws.GaussianMixture(*(t.double() for t in mixture))
    single = torch.distributions.Normal(weights.mean(), weights.std())
    return float(sws.mixture_log_density(weights, mixture).mean() - single.log_prob(weights).mean())


def test_digits_default_weights_form_clusters(default_run: Path, tmp_path: Path) -> None:
    fitted = sws.load_checkpoint(default_run / "checkpoint.pt")
    mixture = fitted.mixtures["mixture"]
    weights = torch.cat([fitted.values[name].reshape(-1) for name in fitted.model.prior_sites])
    # Clustered weights are far better described by the mixture than by one Gaussian.
    assert _per_weight_gain_over_one_gaussian(weights, mixture) > 1.0
    # Besides zero, the weights share at least one negative and one positive value, each
    # holding a clear share of the mass (about 0.11 and 0.19 on the default run).
    pi, mu = mixture.proportions, mixture.means
    assert 0.3 < float(pi[0]) < 0.9
    assert float(pi[1:][mu[1:] < 0].max()) > 0.05 and float(pi[1:][mu[1:] > 0].max()) > 0.05
    assert float((weights.abs() < 3 * mixture.scales[0]).double().mean()) > 0.2

    # The same network trained without the prior has no such structure.
    status, plain = _fit(tmp_path, "prior.weight=0", name="plain")
    assert status == 0
    plain_values = sws.load_checkpoint(plain / "checkpoint.pt").values
    plain_weights = torch.cat([plain_values[name].reshape(-1) for name in fitted.model.prior_sites])
    refit = sws.SoftWeightSharingPrior(n_components=8)
    mixture_plain = refit.initial_mixture(plain_weights)
    for _ in range(100):  # EM towards the best 8-component mixture for the plain weights
        mixture_plain = refit.em_update(plain_weights, mixture_plain)
    assert _per_weight_gain_over_one_gaussian(plain_weights, mixture_plain) < 0.5


def test_checkpoint_loads_back_and_reproduces_the_test_accuracy(default_run: Path) -> None:
    fitted = sws.load_checkpoint(default_run / "checkpoint.pt")
    data = sws.load_dataset("digits", seed=fitted.spec.seed)
    accuracy = float((fitted.predict(data.test_x).argmax(-1) == data.test_y).double().mean())
    assert accuracy == pytest.approx(fitted.metrics["test_accuracy"], abs=1e-12)


def test_runs_with_the_same_seed_are_identical(tmp_path: Path) -> None:
    histories = []
    for name in ("first", "second"):
        status, out = _fit(tmp_path, "inference.epochs=2", name=name)
        assert status == 0
        history = json.loads((out / "metrics.json").read_text())["history"]
        histories.append([(r["loss"], r["test_accuracy"], r["mixtures"]) for r in history])
    assert histories[0] == histories[1]


def test_set_overrides_reach_the_run(tmp_path: Path) -> None:
    status, out = _fit(tmp_path, "inference.epochs=1", "prior.n_components=3", "inference.optimizer=cg",
                       "inference.iterations_per_epoch=3")
    assert status == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and metrics["optimizer"] == "cg"
    assert len(metrics["mixture"]["pi"]) == 3


def test_check_prints_the_validated_spec(capsys) -> None:
    assert main(["check", DIGITS, "--set", "prior.weight=0.5"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["prior"]["weight"] == 0.5 and printed["name"] == "digits"


def _write_idx(path: Path, data: bytes, dims: tuple[int, ...], *, magic: bytes = b"\x00\x00\x08") -> None:
    header = magic + bytes([len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)
    path.write_bytes(gzip.compress(header + data))


def _corrupt_idx_directory(root: Path) -> Path:
    directory = root / "corrupt-idx"
    directory.mkdir()
    _write_idx(directory / "train-images-idx3-ubyte.gz", bytes(2 * 28 * 28 - 5), (2, 28, 28))  # truncated
    _write_idx(directory / "train-labels-idx1-ubyte.gz", bytes(2), (2,))
    _write_idx(directory / "t10k-images-idx3-ubyte.gz", bytes(28 * 28), (1, 28, 28))
    _write_idx(directory / "t10k-labels-idx1-ubyte.gz", bytes(1), (1,))
    return directory


BAD_INPUTS = {
    "unknown config key": (["prior.colour=1"], "colour"),
    "negative lambda": (["prior.weight=-0.1"], "weight"),
    "non-positive sigma": (["prior.init_scale=0"], "init_scale"),
    "no components": (["prior.n_components=0"], "n_components"),
    "missing dataset path": (["data.dataset=idx", "data.path=/nonexistent/mnist"], "/nonexistent/mnist"),
    "wrong type": (["inference.epochs=many"], "inference.epochs"),
    "unknown optimizer": (["inference.optimizer=sgd"], "optimizer"),
    "seed out of range": (["seed=-1"], "seed"),
    "infinite prior weight": (["prior.weight=inf"], "prior.weight"),
    "infinite initial sigma": (["prior.init_scale=inf"], "prior.init_scale"),
    "unknown kernel backend": (["inference.kernels=fortran"], "kernels"),
    "diverging fit": (["inference.learning_rates.weights=1e30", "inference.epochs=3"], "loss became"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_nothing_written(case: str, tmp_path: Path, capsys) -> None:
    overrides, named = BAD_INPUTS[case]
    status, out = _fit(tmp_path, *overrides)
    captured = capsys.readouterr()
    assert status == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bayes-sws: error:") and named in lines[0]
    assert "Traceback" not in captured.err
    assert not out.exists()


def test_corrupt_idx_file_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    directory = _corrupt_idx_directory(tmp_path)
    status, out = _fit(tmp_path, "data.dataset=idx", f"data.path={directory}")
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1
    assert "train-images-idx3-ubyte.gz" in lines[0]
    assert not out.exists()


def test_missing_spec_file_and_invalid_toml_are_one_line_errors(tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("name = [unclosed\n")
    for spec in (str(tmp_path / "absent.toml"), str(broken)):
        assert main(["check", spec]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_cuda_request_without_cuda_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["fit", DIGITS, "--out", str(tmp_path / "x"), "--device", "cuda"]) == 2
    assert "CUDA" in capsys.readouterr().err


def test_console_script_is_installed_and_reports_bad_input_without_traceback(tmp_path: Path) -> None:
    executable = shutil.which("bayes-sws", path=str(Path(sys.executable).parent))
    if executable is None:
        pytest.skip("package not installed (pip install -e .)")
    completed = subprocess.run([executable, "check", DIGITS, "--set", "prior.weight=-1"],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert completed.stderr.count("\n") == 1 and "Traceback" not in completed.stderr


def test_output_path_that_is_a_file_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    occupied = tmp_path / "occupied"
    occupied.write_text("not a directory")
    assert main(["fit", DIGITS, "--out", str(occupied), "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "not a directory" in lines[0]
    assert occupied.read_text() == "not a directory"


def test_two_loaded_checkpoints_keep_their_own_pass_through_parameters(default_run: Path, tmp_path: Path) -> None:
    """Each loaded model evaluates with its own biases, whatever else was loaded or fitted since."""
    first = sws.load_checkpoint(default_run / "checkpoint.pt")
    status, other_run = _fit(tmp_path, "inference.epochs=1", "seed=3", name="other")
    assert status == 0
    second = sws.load_checkpoint(other_run / "checkpoint.pt")
    assert not torch.equal(first.network[1].bias, second.network[1].bias)
    data = sws.load_dataset("digits", seed=first.spec.seed)
    scores = sws.evaluate(first.model, first.values, data.test_x, data.test_y)
    assert scores["accuracy"] == pytest.approx(first.metrics["test_accuracy"], abs=1e-12)
    accuracy = float((first.predict(data.test_x).argmax(-1) == data.test_y).double().mean())
    assert accuracy == pytest.approx(first.metrics["test_accuracy"], abs=1e-12)


def test_checkpoints_load_with_weights_only(default_run: Path) -> None:
    checkpoint = torch.load(default_run / "checkpoint.pt", weights_only=True)
    assert checkpoint["fit_state"]["epoch"] == checkpoint["metrics"]["epochs"]


def test_sunspots_end_to_end_predicts_both_test_periods_better_than_their_mean(tmp_path: Path) -> None:
    out = tmp_path / "sunspots"
    status = main(["fit", str(ROOT / "models" / "sunspots.toml"), "--out", str(out), "--quiet",
                   "--set", "inference.epochs=5"])
    assert status == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # ARV = MSE / variance of the series: 1 is predicting the mean. Five L-BFGS epochs reach
    # about 0.11 on 1921-1955 and 0.39 on 1956-1979 (a harder period).
    assert metrics["test_arv"] < 0.2
    assert metrics["test_1956-1979_arv"] < 0.6
    assert math.isfinite(metrics["valid_arv"])
    assert {"valid_arv", "test_arv"} <= set(metrics["history"][-1])
    fitted = sws.load_checkpoint(out / "checkpoint.pt")
    assert float(fitted.values["noise_scale"]) > 0
