"""`bayes-sws diagnose RUN_DIR` end to end on a small digits run, and its errors."""

import json
from pathlib import Path

import pytest

from bayes_sws import experiment, plots
from bayes_sws.cli import main

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "models" / "digits.toml")
FILES = ("idata.nc", "summary.csv", "reliability.png", "uncertainty.png", "trace.png", "forest.png",
         "weight_posteriors.png", "diagnostics.json")


@pytest.fixture(scope="module")
def map_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("diagnose") / "run"
    assert main(["fit", DIGITS, "--out", str(out), "--quiet", "--set", "inference.epochs=3",
                 "--set", "data.held_out_class=9"]) == 0
    return out


def test_diagnose_of_a_map_run_writes_every_file_and_the_metrics(map_run, capsys):
    assert main(["diagnose", str(map_run), "--quiet"]) == 0
    assert "accuracy=" in capsys.readouterr().out
    for name in FILES:
        assert (map_run / name).stat().st_size > 0
    assert not [p for p in map_run.iterdir() if p.name.startswith(".")]  # no staging left behind
    # a diagnosed run is still a run: `fit --force` may replace it
    assert sorted(p.name for p in map_run.iterdir()) == sorted((*experiment.ARTEFACTS, *experiment.DIAGNOSTICS))
    results = json.loads((map_run / "diagnostics.json").read_text())
    assert (results["method"], results["chains"], results["draws"]) == ("map", 1, 1)
    fitted = json.loads((map_run / "metrics.json").read_text())
    # one draw: the predictive is the MAP network's, so accuracy and NLL are the fit's own
    assert results["accuracy"] == pytest.approx(fitted["test_accuracy"])
    assert results["nll"] == pytest.approx(fitted["test_nll"], rel=1e-4)
    assert 0 <= results["ece"] <= 1 and 0 <= results["brier"] <= 2
    assert set(results["ood_auroc"]) == {"noise", "class_9"}
    assert 0.5 < results["ood_auroc"]["noise"] <= 1 and 0 < results["ood_auroc"]["class_9"] < 1
    assert set(results["mean_entropy"]) == {"test", "noise", "class_9"}
    assert results["mean_mutual_information"] == 0.0
    assert "loo" not in results  # a single draw has nothing to smooth
    summary = (map_run / "summary.csv").read_text().splitlines()
    assert "r_hat" in summary[0] and any(line.startswith("pi[0]") for line in summary)


def test_a_held_out_class_is_left_out_of_the_fit(map_run):
    import bayes_sws as sws

    spec = sws.load_checkpoint(map_run / "checkpoint.pt").spec
    data, held_out = sws.experiment.load_run_data(spec)
    assert 9 not in data.train_y.tolist() and 9 not in data.test_y.tolist()
    assert len(held_out["class_9"]) == 45  # of the 450 digits in the test split


def test_a_failure_midway_writes_nothing(map_run, monkeypatch, capsys):
    for name in FILES:
        (map_run / name).unlink(missing_ok=True)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(plots, "plot_entropy_histograms", broken)
    with pytest.raises(OSError):
        main(["diagnose", str(map_run), "--quiet"])
    assert not any((map_run / name).exists() for name in FILES)
    assert not [p for p in map_run.iterdir() if p.name.startswith(".")]


def test_a_missing_or_bad_run_dir_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["diagnose", str(tmp_path / "nowhere")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("bayes-sws: error: run directory") and error.count("\n") == 1
    assert main(["diagnose", str(tmp_path)]) == 2
    assert "checkpoint.pt not found" in capsys.readouterr().err
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert main(["diagnose", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("bayes-sws: error: checkpoint") and error.count("\n") == 1
    assert main(["diagnose", str(tmp_path), "--draws", "0"]) == 2
    assert "--draws" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_diagnose_of_a_vi_run_has_epistemic_uncertainty_and_loo(tmp_path, capsys):
    out = tmp_path / "vi"
    assert main(["fit", DIGITS, "--out", str(out), "--quiet", "--set", "inference.method=vi",
                 "--set", "inference.epochs=2", "--set", "inference.vi.epochs=2"]) == 0
    assert main(["diagnose", str(out), "--quiet", "--draws", "25", "--seed", "1"]) == 0
    results = json.loads((out / "diagnostics.json").read_text())
    assert (results["method"], results["chains"], results["draws"]) == ("vi", 1, 25)
    assert results["mean_mutual_information"] > 0  # draws differ, so they disagree somewhere
    assert results["loo"]["p_loo"] > 0 and results["loo"]["elpd_loo"] < 0
    from bayes_sws.diagnostics import load_inference_data

    idata = load_inference_data(out / "idata.nc")
    assert idata.posterior.sizes["draw"] == 25 and float(idata.posterior["mu"].std()) > 0
    assert idata.log_likelihood["y"].shape == (1, 25, 450)


def test_diagnose_of_a_regression_run_reports_arv_and_predictive_spread_per_test_period(tmp_path):
    out = tmp_path / "sunspots"
    assert main(["fit", str(ROOT / "models" / "sunspots.toml"), "--out", str(out), "--quiet",
                 "--set", "inference.epochs=3"]) == 0
    assert main(["diagnose", str(out), "--quiet"]) == 0
    results = json.loads((out / "diagnostics.json").read_text())
    fitted = json.loads((out / "metrics.json").read_text())
    for period in ("test", "test_1956-1979"):
        assert results[f"{period}_arv"] == pytest.approx(fitted[f"{period}_arv"], rel=1e-4)
        assert results[f"{period}_predictive_sd"] > 0  # the learned noise scale, for a MAP point
    assert not (out / "reliability.png").exists()
    assert (out / "idata.nc").stat().st_size > 0


@pytest.mark.parametrize("change", ["unknown spec key", "method vi without a guide", "other network"])
def test_a_checkpoint_from_another_version_is_one_line_naming_it(map_run, tmp_path, capsys, change):
    import torch

    checkpoint = torch.load(map_run / "checkpoint.pt", weights_only=True)
    if change == "unknown spec key":
        checkpoint["spec"]["inference"]["future_setting"] = 1
    elif change == "method vi without a guide":
        checkpoint["spec"]["inference"]["method"] = "vi"  # its fit_state holds a MAP guide
    else:
        checkpoint["spec"]["network"]["hidden"] = [7]
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    assert main(["diagnose", str(tmp_path), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"bayes-sws: error: checkpoint {tmp_path / 'checkpoint.pt'}") and error.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_ctrl_c_midway_writes_nothing_and_exits_130(map_run, monkeypatch, capsys):
    for name in FILES:
        (map_run / name).unlink(missing_ok=True)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "plot_reliability", interrupted)
    assert main(["diagnose", str(map_run), "--quiet"]) == 130
    assert capsys.readouterr().err == "bayes-sws: interrupted\n"
    assert not any((map_run / name).exists() for name in FILES)
    assert not [p for p in map_run.iterdir() if p.name.startswith(".")]


def test_ctrl_c_while_the_files_are_moved_in_still_moves_them_all(map_run, monkeypatch):
    import os
    import signal

    import bayes_sws.diagnose as diagnose_module

    for name in FILES:
        (map_run / name).unlink(missing_ok=True)
    replace = os.replace
    calls = []

    def replace_then_ctrl_c(source, target):
        replace(source, target)
        calls.append(target)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(diagnose_module.os, "replace", replace_then_ctrl_c)
    assert main(["diagnose", str(map_run), "--quiet"]) == 130
    assert all((map_run / name).exists() for name in FILES)  # all of them or (before) none, never some
    assert not [p for p in map_run.iterdir() if p.name.startswith(".")]


def test_fit_force_replaces_a_diagnosed_run(tmp_path):
    out = str(tmp_path / "run")
    small = ["--quiet", "--set", "inference.epochs=1", "--set", "network.hidden=[8]"]
    assert main(["fit", DIGITS, "--out", out, *small]) == 0
    assert main(["diagnose", out, "--quiet"]) == 0
    assert main(["fit", DIGITS, "--out", out, "--force", *small]) == 0
    assert sorted(p.name for p in Path(out).iterdir()) == sorted(experiment.ARTEFACTS)
