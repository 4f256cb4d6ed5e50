"""The benchmark scripts refuse bad arguments in one line, before any training."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _benchmark(name: str, monkeypatch, *, blocked: tuple[str, ...]) -> ModuleType:
    """Import ``benchmarks/{name}.py`` with the functions in ``blocked`` failing if called."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking the arguments")

    for function in blocked:
        monkeypatch.setattr(module, function, no_training)
    return module


@pytest.mark.parametrize("arguments,message", [
    (["--set", "compression.nosuch=1"], "nosuch"),
    (["--prune-fractions", "1.5"], "prune_fraction"),
    (["--taus", "0.1,abc"], "abc"),
    (["--methods", "sws,nosuch"], "nosuch"),
])
def test_bad_compression_settings_stop_the_benchmark_with_one_line(monkeypatch, arguments: list[str],
                                                                  message: str) -> None:
    bench = _benchmark("bench_compression", monkeypatch, blocked=("pretrained_model", "load_dataset"))
    monkeypatch.setattr(sys, "argv", ["bench_compression.py", "--models", "lenet-300-100", "--seeds", "0",
                                      *arguments])
    with pytest.raises(SystemExit) as stopped:
        bench.main()
    text = str(stopped.value.code)
    assert text.startswith("bench_compression: ") and message in text and "\n" not in text


@pytest.mark.parametrize("epochs", ["0", "-3"])
def test_a_vi_epoch_candidate_below_one_is_an_argument_error(monkeypatch, capsys, epochs: str) -> None:
    bench = _benchmark("bench_uncertainty", monkeypatch, blocked=("fashion",))
    monkeypatch.setattr(sys, "argv", ["bench_uncertainty.py", "--no-sunspots", "--vi-epochs", "2", epochs])
    with pytest.raises(SystemExit) as stopped:
        bench.main()
    assert stopped.value.code == 2
    assert "--vi-epochs" in capsys.readouterr().err


def test_a_missing_table_file_stops_the_benchmark_with_one_line(monkeypatch, tmp_path: Path) -> None:
    bench = _benchmark("bench_compression", monkeypatch, blocked=("pretrained_model", "load_dataset"))
    monkeypatch.setattr(sys, "argv", ["bench_compression.py", "--table-from", str(tmp_path / "missing.json")])
    with pytest.raises(SystemExit) as stopped:
        bench.main()
    text = str(stopped.value.code)
    assert text.startswith("bench_compression: cannot read ") and "\n" not in text


@pytest.mark.parametrize("arguments", [["--skipping", "--dense-kernel", "missing.so"], ["--dense-kernel", __file__]])
def test_a_dense_kernel_that_is_no_file_or_without_skipping_is_an_argument_error(monkeypatch, capsys,
                                                                                 arguments: list[str]) -> None:
    bench = _benchmark("bench_prior", monkeypatch, blocked=("compare_skipping", "measure"))
    with pytest.raises(SystemExit) as stopped:
        bench.main(arguments)
    assert stopped.value.code == 2
    assert "--dense-kernel" in capsys.readouterr().err
