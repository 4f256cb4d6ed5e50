"""Hostile and careless input: every failure a user's input can cause is one line (BayesSWSError, exit 2).

Property-based (hypothesis, few examples each): the prior stays finite over extreme
weights, scales and proportions on every kernel backend; random bytes and
mutations of valid spec, IDX and checkpoint files give a BayesSWSError or a valid
result, never another exception or a hang.
"""

from __future__ import annotations

import gzip
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bayes_sws import experiment
from bayes_sws.cli import main
from bayes_sws.data import load_idx_dataset, read_idx
from bayes_sws.errors import BayesSWSError, DataError, SpecError
from bayes_sws.prior import GaussianMixture, mixture_log_prob_sum
from bayes_sws.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "models" / "digits.toml")
FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def one_line(error: BaseException) -> None:
    assert isinstance(error, BayesSWSError) and "\n" not in str(error), repr(error)


def idx_bytes(array: np.ndarray) -> bytes:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    return (bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
            + array.tobytes())


def write_idx_set(directory: Path, *, train_labels=(0, 1, 2, 0, 1), rows: int = 4) -> None:
    images = np.zeros((len(train_labels), rows, 3), dtype=np.uint8)
    arrays = [images, np.array(train_labels, dtype=np.uint8), images[:3], np.array([0, 1, 2], dtype=np.uint8)]
    for stem, array in zip(STEMS, arrays):
        (directory / stem).write_bytes(idx_bytes(array))


# --------------------------------------------------------------------------- specifications


@pytest.mark.parametrize("name", ["../../etc", "/abs", "runs/x", "a\\b", "c:d", "a\x00b", "tab\tname", "..", ".",
                                  "", "x" * 201])
def test_a_name_that_is_not_one_plain_path_component_is_refused(name):
    with pytest.raises(SpecError, match="name") as raised:
        parse_spec({"name": name})
    one_line(raised.value)


def test_a_fifo_a_directory_a_huge_file_and_deep_nesting_as_spec_are_one_line_errors(tmp_path):
    fifo = tmp_path / "spec.toml"
    os.mkfifo(fifo)  # nobody writes to it: opening it would block forever
    huge = tmp_path / "huge.toml"
    huge.write_text("# " + "x" * (1 << 20))
    deep = tmp_path / "deep.toml"
    deep.write_text("value = " + "[" * 50_000)
    for path, fragment in [(fifo, "not a regular file"), (tmp_path, "not a regular file"),
                           (huge, "larger than"), (deep, "nested too deeply")]:
        with pytest.raises(SpecError, match=fragment) as raised:
            load_spec(path)
        one_line(raised.value)
    with pytest.raises(SpecError, match="nested too deeply"):
        load_spec(DIGITS, overrides=["prior.weight=" + "[" * 50_000])


@pytest.mark.parametrize("override, fragment", [
    ("network.hidden=[1000000000]", "network parameters"),
    ("prior.n_components=1000000", "mixture components"),
])
def test_a_model_too_big_for_memory_is_refused_before_allocating(tmp_path, capsys, override, fragment):
    started = time.perf_counter()
    assert main(["fit", DIGITS, "--out", str(tmp_path / "run"), "--quiet", "--set", override]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and fragment in error and "GiB" in error
    assert time.perf_counter() - started < 20 and not (tmp_path / "run").exists()
    assert not (tmp_path / "run.partial").exists()


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "bayes_sws.cli", "fit", DIGITS, "--out", str(tmp_path / "r")],
                               cwd=ROOT, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    maps = Path(f"/proc/{process.pid}/maps")
    for _ in range(600):  # until torch's library is being loaded: the import, inside main
        if process.poll() is not None or "libtorch" in maps.read_text():
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, error = process.communicate(timeout=60)
    assert process.returncode == 130 and error.count("\n") == 1 and "interrupted" in error, error
    assert "--resume" not in error and not (tmp_path / "r.partial").exists()  # nothing saved: nothing to resume


# --------------------------------------------------------------------------- data


def test_a_stray_label_empty_images_and_an_unseen_test_class_are_refused(tmp_path):
    cases = {"stray": dict(train_labels=(0, 1, 2, 0, 200)), "empty": dict(rows=0)}
    for name, kwargs in cases.items():
        directory = tmp_path / name
        directory.mkdir()
        write_idx_set(directory, **kwargs)
        with pytest.raises(DataError) as raised:
            load_idx_dataset(directory)
        one_line(raised.value)
        assert ("0..200 occur" if name == "stray" else "(0, 3) pixels") in str(raised.value)
    directory = tmp_path / "unseen"
    directory.mkdir()
    write_idx_set(directory, train_labels=(0, 1, 0, 1, 0))
    with pytest.raises(DataError, match="never show"):
        load_idx_dataset(directory)


def test_idx_decompression_stops_at_the_size_its_header_declares(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb-idx1-ubyte.gz"
    header = bytes([0, 0, 0x08, 1]) + struct.pack(">I", 10)
    bomb.write_bytes(gzip.compress(header + bytes(20_000_000), compresslevel=1))
    reads = []
    original = gzip.GzipFile.read
    monkeypatch.setattr(gzip.GzipFile, "read", lambda self, size=-1: reads.append(size) or original(self, size))
    with pytest.raises(DataError, match="has trailing bytes"):
        read_idx(bomb)
    assert reads and all(0 <= size <= 11 for size in reads)  # never an unbounded read
    huge = tmp_path / "huge-idx3-ubyte"
    huge.write_bytes(bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2**32 - 1, 2**32 - 1, 2**32 - 1))
    with pytest.raises(DataError, match="more than this machine"):
        read_idx(huge)


def _valid_idx() -> bytes:
    return idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))


@FEW
@given(data=st.data(), gzipped=st.booleans())
def test_fuzz_the_idx_reader_gives_a_data_error_or_a_tensor(tmp_path_factory, data, gzipped):
    raw = bytearray(_valid_idx())
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(0, len(raw) + 4))] + data.draw(st.binary(max_size=8))
    path = tmp_path_factory.mktemp("idx") / ("x-idx3-ubyte.gz" if gzipped else "x-idx3-ubyte")
    path.write_bytes(gzip.compress(bytes(raw)) if gzipped else bytes(raw))
    try:
        result = read_idx(path)
    except DataError as error:
        one_line(error)
    else:
        assert isinstance(result, torch.Tensor)


@FEW
@given(text=st.one_of(st.text(max_size=200), st.builds(
    lambda base, cut, junk: base[:cut] + junk, st.just(Path(DIGITS).read_text()), st.integers(0, 1400),
    st.text(max_size=30))))
def test_fuzz_the_spec_loader_gives_a_spec_error_or_a_spec(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("spec") / "fuzz.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass") if "\ud800" not in text else None
    if not path.exists():
        return
    try:
        load_spec(path)
    except SpecError as error:
        one_line(error)


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "run"
    spec = load_spec(DIGITS, overrides=["network.hidden=[4]", "inference.epochs=1", "inference.batch_size=512"])
    experiment.run(spec, out_dir=out, progress=False)
    return out / "checkpoint.pt"


def _mutated(content: dict, key_path: tuple, value) -> dict:
    copy = {**content}
    node = copy
    for key in key_path[:-1]:
        node[key] = {**node[key]}
        node = node[key]
    if value is KeyError:
        del node[key_path[-1]]
    else:
        node[key_path[-1]] = value
    return copy


STRUCTURAL = {
    "no values": (("values",), KeyError),
    "values not a dict": (("values",), [1, 2]),
    "a site of the wrong shape": (("values", "1.weight"), torch.zeros(3, 3)),
    "a site missing": (("values", "1.weight"), KeyError),
    "network weight of the wrong shape": (("network", "1.weight"), torch.zeros(2)),
    "network entry not a tensor": (("network", "1.weight"), "text"),
    "a network entry missing": (("network", "3.bias"), KeyError),
    "invalid spec": (("spec", "prior"), {"weight": -1.0}),
    "spec not a table": (("spec",), "name"),
    "other format": (("format",), 99),
    "negative input shape": (("data", "input_shape"), [-1]),
    "huge label count": (("data", "n_outputs"), 10**12),
    "unknown task": (("data", "task"), "poetry"),
    "no metrics": (("metrics",), KeyError),
}


@pytest.mark.parametrize("case", sorted(STRUCTURAL))
def test_a_structurally_wrong_checkpoint_is_one_line_never_a_raw_error_or_untrained_weights(
        checkpoint, tmp_path, case):
    content = torch.load(checkpoint, weights_only=True)
    path = tmp_path / "bad.pt"
    torch.save(_mutated(content, *STRUCTURAL[case]), path)
    with pytest.raises(BayesSWSError) as raised:
        experiment.load_checkpoint(path)
    one_line(raised.value)


@FEW
@given(data=st.data())
def test_fuzz_the_checkpoint_loader_gives_a_bayes_sws_error_or_a_model(checkpoint, tmp_path_factory, data):
    raw = bytearray(checkpoint.read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(0, len(raw)))] if data.draw(st.booleans()) else raw
    path = tmp_path_factory.mktemp("fuzz") / "checkpoint.pt"
    path.write_bytes(bytes(raw))
    try:
        fitted = experiment.load_checkpoint(path)
    except BayesSWSError as error:
        one_line(error)
    else:
        assert set(fitted.values) == set(fitted.model.initial_values())


# --------------------------------------------------------------------------- the prior's numerics


@FEW
@given(weight_range=st.floats(1e-3, 1e3), scale=st.floats(1e-4, 1e2), epsilon=st.floats(1e-12, 1e-2),
       seed=st.integers(0, 2**16))
def test_the_prior_value_and_gradients_stay_finite_at_extremes(kernel_backend, weight_range, scale, epsilon, seed):
    generator = torch.Generator().manual_seed(seed)
    weights = ((torch.rand(1, 64, generator=generator) * 2 - 1) * weight_range).requires_grad_()
    proportions = torch.tensor([1 - 3 * epsilon, epsilon, epsilon, epsilon], dtype=torch.float64).float()
    log_proportions = proportions.log().requires_grad_()
    means = torch.tensor([0.0, -0.5, 0.5, 1.0]).requires_grad_()
    scales = torch.tensor([scale, scale * 0.5, 1.0, scale]).clamp(1e-4, 1e2).requires_grad_()
    value = mixture_log_prob_sum(weights, GaussianMixture(log_proportions, means, scales))
    value.sum().backward()
    assert bool(torch.isfinite(value).all()), (weight_range, scale, epsilon)
    for tensor in (weights, log_proportions, means, scales):
        assert bool(torch.isfinite(tensor.grad).all()), (kernel_backend, weight_range, scale, epsilon)
