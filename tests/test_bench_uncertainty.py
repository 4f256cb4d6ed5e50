"""benchmarks/bench_uncertainty.py: a VI epoch candidate below one stops it at parsing, before any fit."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_uncertainty.py"


@pytest.mark.parametrize("epochs", ["0", "-3"])
def test_a_vi_epoch_candidate_below_one_is_an_argument_error(monkeypatch, capsys, epochs: str) -> None:
    spec = importlib.util.spec_from_file_location("bench_uncertainty", BENCHMARK)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def no_fit(*args, **kwargs):
        raise AssertionError("fitted before checking the arguments")

    monkeypatch.setattr(bench, "fashion", no_fit)
    monkeypatch.setattr(sys, "argv", ["bench_uncertainty.py", "--no-sunspots", "--vi-epochs", "2", epochs])
    with pytest.raises(SystemExit) as stopped:
        bench.main()
    assert stopped.value.code == 2
    assert "--vi-epochs" in capsys.readouterr().err
