"""benchmarks/bench_compression.py: bad settings stop it with one line before any training."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_compression.py"


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_compression", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking the settings")

    monkeypatch.setattr(module, "pretrained_model", no_training)
    monkeypatch.setattr(module, "load_dataset", no_training)
    return module


@pytest.mark.parametrize("arguments,message", [
    (["--set", "compression.nosuch=1"], "nosuch"),
    (["--prune-fractions", "1.5"], "prune_fraction"),
    (["--taus", "0.1,abc"], "abc"),
    (["--methods", "sws,nosuch"], "nosuch"),
])
def test_bad_settings_stop_the_benchmark_with_one_line_before_training(bench, monkeypatch, arguments: list[str],
                                                                      message: str) -> None:
    monkeypatch.setattr(sys, "argv", ["bench_compression.py", "--models", "lenet-300-100", "--seeds", "0",
                                      *arguments])
    with pytest.raises(SystemExit) as stopped:
        bench.main()
    text = str(stopped.value.code)
    assert text.startswith("bench_compression: ") and message in text and "\n" not in text
