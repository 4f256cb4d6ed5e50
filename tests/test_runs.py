"""Runs that survive: per-epoch checkpoints, exact resume, all-or-nothing results (bayes_sws.storage)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bayes_sws import cli, experiment, fitting, plots
from bayes_sws.cli import main
from bayes_sws.errors import BayesSWSError
from bayes_sws.spec import load_spec
from bayes_sws.storage import lock_directory, partial_dir, publish, write_atomically

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "models" / "digits.toml")
SMALL = ["network.hidden=[8]", "inference.epochs=3", "inference.pretrain_epochs=2", "inference.batch_size=256",
         "inference.em_every=3"]


def small_spec():
    return load_spec(DIGITS, overrides=SMALL)


def comparable(metrics: dict) -> dict:
    return {key: value for key, value in metrics.items() if key != "seconds"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("whole") / "run"
    return experiment.run(small_spec(), out_dir=out, progress=False)


def interrupt_at_step(monkeypatch, calls: int) -> None:
    """Make the fit loop's ``calls``-th step (counting every phase) raise KeyboardInterrupt, as Ctrl-C would."""
    original, count = fitting._take_step, [0]

    def step(*args, **kwargs):
        count[0] += 1
        if count[0] == calls:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(fitting, "_take_step", step)


def test_an_interrupted_and_resumed_run_ends_with_exactly_the_uninterrupted_metrics(
        tmp_path, monkeypatch, uninterrupted):
    out = tmp_path / "run"
    steps_per_epoch = 6  # 1347 training digits in batches of 256
    interrupt_at_step(monkeypatch, steps_per_epoch + 3)  # mid-way through the second pretraining epoch
    with pytest.raises(KeyboardInterrupt):
        experiment.run(small_spec(), out_dir=out, progress=False)
    state = torch.load(partial_dir(out) / "state.pt", weights_only=True)
    assert (state["phase"], state["fit_state"]["epoch"]) == ("pretrain", 1) and not out.exists()

    interrupt_at_step(monkeypatch, steps_per_epoch * 2 + 4)  # resumed: the second training epoch
    with pytest.raises(KeyboardInterrupt):
        experiment.run(small_spec(), out_dir=out, progress=False, resume=True)
    state = torch.load(partial_dir(out) / "state.pt", weights_only=True)
    assert (state["phase"], state["fit_state"]["epoch"]) == ("train", 1)

    monkeypatch.undo()
    resumed = experiment.run(small_spec(), out_dir=out, progress=False, resume=True)
    assert comparable(resumed) == comparable(uninterrupted)
    assert json.loads((out / "metrics.json").read_text())["test_accuracy"] == uninterrupted["test_accuracy"]
    assert not partial_dir(out).exists()


def test_a_signal_mid_epoch_saves_the_position_in_the_epoch_and_the_resumed_run_matches(
        tmp_path, monkeypatch, uninterrupted):
    out = tmp_path / "run"
    steps_per_epoch = 6
    original, count = fitting._take_step, [0]

    def step(*args, **kwargs):  # the signal arrives while step 3 of the first training epoch runs
        value = original(*args, **kwargs)
        count[0] += 1
        if count[0] == steps_per_epoch * 2 + 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return value

    monkeypatch.setattr(fitting, "_take_step", step)
    with pytest.raises(KeyboardInterrupt):
        experiment.run(small_spec(), out_dir=out, progress=False)
    state = torch.load(partial_dir(out) / "state.pt", weights_only=True)
    assert (state["phase"], state["fit_state"]["epoch"], state["fit_state"]["epoch_progress"]["steps"]) == (
        "train", 0, 3)
    monkeypatch.undo()
    resumed = experiment.run(small_spec(), out_dir=out, progress=False, resume=True)
    assert comparable(resumed) == comparable(uninterrupted)


def test_resume_refuses_another_specification_and_a_missing_state(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with pytest.raises(BayesSWSError, match="nothing to resume"):
        experiment.run(small_spec(), out_dir=out, progress=False, resume=True)
    interrupt_at_step(monkeypatch, 8)
    with pytest.raises(KeyboardInterrupt):
        experiment.run(small_spec(), out_dir=out, progress=False)
    other = load_spec(DIGITS, overrides=[*SMALL, "prior.weight=0.5"])
    with pytest.raises(BayesSWSError, match="another specification"):
        experiment.run(other, out_dir=out, progress=False, resume=True)
    with pytest.raises(BayesSWSError, match="unfinished run"):
        experiment.run(small_spec(), out_dir=out, progress=False)


def test_sigterm_stops_a_cli_fit_in_one_line_and_keeps_its_state(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "bayes_sws.cli", "fit", DIGITS, "--out", str(out), "--quiet",
               *(f"--set={o}" for o in SMALL), "--set=inference.epochs=400"]
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    state = partial_dir(out) / "state.pt"
    for _ in range(1200):  # wait for the first checkpoint, at most 60 s
        if state.exists() or process.poll() is not None:
            break
        subprocess.run(["sleep", "0.05"])
    process.send_signal(signal.SIGTERM)
    _, error = process.communicate(timeout=60)
    assert process.returncode == 130, error
    assert error.strip().count("\n") == 0 and "interrupted" in error and "Traceback" not in error
    assert f"state is in {partial_dir(out)}/; continue it with --resume" in error, error
    assert state.exists() and not out.exists()
    status = main(["fit", DIGITS, "--out", str(out), "--quiet", "--resume",
                   *(f"--set={o}" for o in [*SMALL, "inference.epochs=1"])])
    assert status == 2  # epochs changed: another specification, refused in one line


def test_an_existing_run_is_replaced_only_with_force_and_the_cli_says_so(tmp_path, capsys, uninterrupted):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    arguments = ["fit", DIGITS, "--out", str(out), "--quiet", *(f"--set={o}" for o in SMALL)]
    assert main(arguments) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == "{}"
    assert main([*arguments, "--force"]) == 0
    assert "replaced the earlier run" in capsys.readouterr().out
    assert comparable(json.loads((out / "metrics.json").read_text())) == comparable(uninterrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_failure_while_writing_leaves_the_old_run_whole_and_no_temporaries(tmp_path, monkeypatch, failure,
                                                                            uninterrupted):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("old")

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(plots, "plot_history", fail)  # the last artefact: the others are written by then
    expected = BayesSWSError if isinstance(failure, OSError) else KeyboardInterrupt
    with pytest.raises(expected, match="No space left" if expected is BayesSWSError else None):
        experiment.run(small_spec(), out_dir=out, progress=False, force=True)
    assert [p.name for p in out.iterdir()] == ["metrics.json"] and (out / "metrics.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run.partial"]  # the fit's state is kept
    assert [p.name for p in partial_dir(out).iterdir()] == ["state.pt"]
    monkeypatch.undo()
    resumed = experiment.run(small_spec(), out_dir=out, progress=False, resume=True, force=True)  # no refit
    assert comparable(resumed) == comparable(uninterrupted) and not partial_dir(out).exists()


def test_a_read_only_output_place_is_refused_before_fitting(tmp_path, monkeypatch):
    place = tmp_path / "readonly"
    place.mkdir()
    original = Path.mkdir

    def read_only_mkdir(self, *args, **kwargs):  # the tests may run as root, for whom chmod does not bite
        if place in self.parents:
            raise OSError(errno.EROFS, "Read-only file system")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only_mkdir)
    monkeypatch.setattr(experiment, "load_dataset", lambda *a, **k: pytest.fail("fitted before checking"))
    with pytest.raises(BayesSWSError, match="Read-only file system"):
        experiment.run(small_spec(), out_dir=place / "run", progress=False)
    assert list(place.iterdir()) == []


def test_publish_and_write_atomically_clean_up_after_a_failure(tmp_path):
    def half_then_fail(directory: Path) -> None:
        (directory / "a").write_text("a")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(BayesSWSError, match="No space left"):
        publish(tmp_path / "run", half_then_fail)
    with pytest.raises(BayesSWSError, match="No space left"):
        write_atomically(tmp_path / "file.txt", lambda path: half_then_fail(Path(path).parent))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # what the writer itself put there

    publish(tmp_path / "run", lambda d: (d / "x").write_text("1"))
    publish(tmp_path / "run", lambda d: (d / "y").write_text("2"), force=True)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "run"]


@pytest.mark.parametrize("damage", ["garbage", "not a state", "wrong shapes"])
def test_a_damaged_run_state_is_refused_in_one_line_on_resume(tmp_path, monkeypatch, damage):
    out = tmp_path / "run"
    interrupt_at_step(monkeypatch, 8)
    with pytest.raises(KeyboardInterrupt):
        experiment.run(small_spec(), out_dir=out, progress=False)
    monkeypatch.undo()
    path = partial_dir(out) / "state.pt"
    state = torch.load(path, weights_only=True)
    if damage == "garbage":
        path.write_bytes(b"PK\x03\x04 not really a zip")
    elif damage == "not a state":
        torch.save({**state, "fit_state": {**state["fit_state"], "epoch": "one"}}, path)
    else:
        network = {name: torch.zeros(2) for name in state["fit_state"]["network"]}
        torch.save({**state, "fit_state": {**state["fit_state"], "network": network}}, path)
    with pytest.raises(BayesSWSError) as raised:
        experiment.run(small_spec(), out_dir=out, progress=False, resume=True)
    assert "\n" not in str(raised.value) and not out.exists()


def never_fit(monkeypatch) -> None:
    monkeypatch.setattr(experiment, "load_dataset", lambda *a, **k: pytest.fail("fitted before checking"))


def test_the_root_the_current_directory_and_a_directory_of_other_files_are_refused_before_fitting(
        tmp_path, monkeypatch):
    never_fit(monkeypatch)
    with pytest.raises(BayesSWSError, match="root"):
        experiment.run(small_spec(), out_dir="/", progress=False)
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    monkeypatch.chdir(project)
    for out_dir in (".", "../project", str(project)):
        with pytest.raises(BayesSWSError, match="not a bayes-sws run.*notes.txt"):
            experiment.run(small_spec(), out_dir=out_dir, progress=False, force=True)
    assert [p.name for p in project.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]


def test_a_run_whose_staging_directory_another_run_holds_is_refused_before_fitting(tmp_path, monkeypatch):
    never_fit(monkeypatch)
    out = tmp_path / "run"
    partial_dir(out).mkdir()
    held = lock_directory(partial_dir(out))  # as a concurrent run into the same place holds it
    try:
        for resume, force in ((False, False), (False, True)):
            with pytest.raises(BayesSWSError, match="another run is using"):
                experiment.run(small_spec(), out_dir=out, progress=False, resume=resume, force=force)
    finally:
        os.close(held)
    assert partial_dir(out).is_dir()


def test_a_symlinked_run_directory_is_replaced_through_the_link_and_a_stale_empty_staging_is_taken(
        tmp_path, uninterrupted):
    real = tmp_path / "real"
    real.mkdir()
    (real / "metrics.json").write_text("old")
    link = tmp_path / "link"
    link.symlink_to(real)
    partial_dir(real).mkdir()  # what a run killed before its first epoch leaves
    metrics = experiment.run(small_spec(), out_dir=link, progress=False, force=True)
    assert comparable(metrics) == comparable(uninterrupted)
    assert link.is_symlink() and sorted(p.name for p in real.iterdir()) == sorted(experiment.ARTEFACTS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_a_failed_swap_restores_the_old_run_and_leaves_no_temporary(tmp_path, monkeypatch):
    out = tmp_path / "run"
    publish(out, lambda d: (d / "x").write_text("old"))
    original = os.replace

    def failing_replace(source, target):
        if Path(source) == out:
            raise OSError(errno.EBUSY, "Device or resource busy")
        return original(source, target)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(BayesSWSError, match="busy"):
        publish(out, lambda d: (d / "y").write_text("new"), force=True)
    assert [p.name for p in out.iterdir()] == ["x"] and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_at_start_up_is_one_line_and_status_130(signum):
    program = ("import os, sys; from bayes_sws import cli, spec; "
               f"spec.load_spec = lambda *a, **k: os.kill(os.getpid(), {int(signum)}); "
               "sys.exit(cli.main(['check', 'any.toml']))")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 130, done.stderr
    assert done.stderr.count("\n") == 1 and "interrupted" in done.stderr


def test_an_interrupt_while_parsing_the_command_line_is_status_130(monkeypatch, capsys):
    class Interrupted:
        def parse_args(self, argv):
            raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_parser", Interrupted)
    assert main(["check", "any.toml"]) == 130 and "interrupted" in capsys.readouterr().err
