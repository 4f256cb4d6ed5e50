"""Tests of bayes_sws.data: IDX reading, dataset loaders and the batch sampler."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import statsmodels.api as sm
import torch

from bayes_sws.data import (
    DATASET_NAMES,
    FASHION_MNIST_DIR,
    Dataset,
    batches,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_idx_dataset,
    load_sunspots,
    read_idx,
)
from bayes_sws.errors import DataError

IDX_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
    np.dtype(np.float64): 0x0E,
}
STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode ``array`` in the IDX format."""
    header = struct.pack(">BBBB", 0, 0, IDX_CODES[array.dtype], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file, gzipped when ``path`` ends in ``.gz``."""
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_mnist_set(
    directory: Path, *, n_train: int = 5, n_test: int = 3, suffix: str = "", seed: int = 0
) -> dict[str, np.ndarray]:
    """Write a tiny 4x3-pixel MNIST-format dataset and return its arrays by file stem."""
    rng = np.random.default_rng(seed)
    arrays = {
        STEMS[0]: rng.integers(0, 256, size=(n_train, 4, 3), dtype=np.uint8),
        STEMS[1]: (rng.permutation(n_train) % 3).astype(np.uint8),  # classes 0..2, each present
        STEMS[2]: rng.integers(0, 256, size=(n_test, 4, 3), dtype=np.uint8),
        STEMS[3]: rng.integers(0, 3, size=n_test, dtype=np.uint8),
    }
    for stem, array in arrays.items():
        write_idx(directory / f"{stem}{suffix}", array)
    return arrays


def assert_one_line_data_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def scaled_sunspots() -> np.ndarray:
    """Sunspot activity 1700-1979 divided by its maximum, computed independently."""
    frame = sm.datasets.sunspots.load_pandas().data
    activity = frame.loc[frame["YEAR"] <= 1979, "SUNACTIVITY"].to_numpy()
    return activity / activity.max()


@pytest.fixture(scope="module")
def sunspots() -> Dataset:
    return load_sunspots()


# --- read_idx ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(IDX_CODES))
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trips_every_dtype_plain_and_gzipped(tmp_path, dtype, suffix):
    low = 0 if dtype == np.uint8 else -60
    array = (np.arange(24).reshape(2, 3, 4) * 5 + low).astype(dtype)
    if dtype.kind == "f":
        array /= 7
    path = write_idx(tmp_path / f"a-idx3-ubyte{suffix}", array)
    tensor = read_idx(path)
    assert tensor.shape == (2, 3, 4)
    assert tensor.numpy().dtype == dtype
    np.testing.assert_array_equal(tensor.numpy(), array)


def test_read_idx_detects_gzip_content_without_gz_suffix(tmp_path):
    array = np.arange(6, dtype=np.uint8)
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(gzip.compress(idx_bytes(array)))
    np.testing.assert_array_equal(read_idx(path).numpy(), array)


def test_read_idx_returns_writable_native_tensor(tmp_path):
    tensor = read_idx(write_idx(tmp_path / "x", np.arange(4, dtype=np.int32)))
    tensor += 1
    assert tensor.tolist() == [1, 2, 3, 4]


def corrupt_bad_magic(data: bytes) -> bytes:
    return b"\x01\x02" + data[2:]


def corrupt_unknown_dtype(data: bytes) -> bytes:
    return data[:2] + b"\x0a" + data[3:]


def corrupt_truncated(data: bytes) -> bytes:
    return data[:-1]


def corrupt_trailing_bytes(data: bytes) -> bytes:
    return data + b"\x00"


def corrupt_short_header(data: bytes) -> bytes:
    return data[:6]


@pytest.mark.parametrize(
    ("corrupt", "fragment"),
    [
        (corrupt_bad_magic, "bad magic number"),
        (corrupt_unknown_dtype, "unknown data type code 0x0a"),
        (corrupt_truncated, "is truncated"),
        (corrupt_trailing_bytes, "has trailing bytes"),
        (corrupt_short_header, "is truncated"),
    ],
)
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_rejects_corrupt_file_with_one_line_data_error(
    tmp_path, corrupt, fragment, suffix
):
    data = corrupt(idx_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4)))
    path = tmp_path / f"bad-idx2-ubyte{suffix}"
    path.write_bytes(gzip.compress(data) if suffix else data)
    with pytest.raises(DataError) as excinfo:
        read_idx(path)
    assert_one_line_data_error(excinfo, str(path), fragment)


@pytest.mark.parametrize(
    "payload",
    [b"this is not gzip", gzip.compress(idx_bytes(np.arange(50, dtype=np.uint8)))[:-10]],
    ids=["not-gzip", "truncated-gzip"],
)
def test_read_idx_rejects_bad_gzip_with_one_line_data_error(tmp_path, payload):
    path = tmp_path / "images-idx3-ubyte.gz"
    path.write_bytes(payload)
    with pytest.raises(DataError) as excinfo:
        read_idx(path)
    assert_one_line_data_error(excinfo, str(path), "not valid gzip")


def test_read_idx_rejects_missing_file_naming_it(tmp_path):
    path = tmp_path / "nowhere-idx1-ubyte"
    with pytest.raises(DataError) as excinfo:
        read_idx(path)
    assert_one_line_data_error(excinfo, str(path))


# --- load_idx_dataset / load_fashion_mnist -----------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_load_idx_dataset_scales_images_and_keeps_labels(tmp_path, suffix):
    arrays = write_mnist_set(tmp_path, suffix=suffix)
    dataset = load_idx_dataset(tmp_path, name="tiny")
    assert dataset.name == "tiny"
    assert dataset.task == "classification"
    assert dataset.input_shape == (1, 4, 3)
    assert dataset.train_x.shape == (5, 1, 4, 3) and dataset.test_x.shape == (3, 1, 4, 3)
    assert dataset.train_x.dtype == torch.float32 and dataset.train_y.dtype == torch.int64
    np.testing.assert_allclose(dataset.train_x[:, 0].numpy(), arrays[STEMS[0]] / 255.0, rtol=1e-6)
    np.testing.assert_allclose(dataset.test_x[:, 0].numpy(), arrays[STEMS[2]] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(dataset.train_y.numpy(), arrays[STEMS[1]])
    np.testing.assert_array_equal(dataset.test_y.numpy(), arrays[STEMS[3]])
    largest = max(arrays[STEMS[1]].max(), arrays[STEMS[3]].max())
    assert dataset.n_classes == largest + 1


def test_load_idx_dataset_prefers_plain_file_over_gz(tmp_path):
    write_mnist_set(tmp_path, suffix=".gz", seed=1)
    plain = write_mnist_set(tmp_path, seed=2)
    dataset = load_idx_dataset(tmp_path)
    np.testing.assert_array_equal(dataset.train_y.numpy(), plain[STEMS[1]])


def test_load_idx_dataset_rejects_missing_directory(tmp_path):
    with pytest.raises(DataError) as excinfo:
        load_idx_dataset(tmp_path / "absent")
    assert_one_line_data_error(excinfo, "not found", str(tmp_path / "absent"))


@pytest.mark.parametrize("stem", STEMS)
def test_load_idx_dataset_names_the_missing_file(tmp_path, stem):
    write_mnist_set(tmp_path)
    (tmp_path / stem).unlink()
    with pytest.raises(DataError) as excinfo:
        load_idx_dataset(tmp_path)
    assert_one_line_data_error(excinfo, "missing", stem)


def test_load_idx_dataset_rejects_image_label_count_mismatch(tmp_path):
    write_mnist_set(tmp_path)
    write_idx(tmp_path / STEMS[1], np.zeros(4, dtype=np.uint8))
    with pytest.raises(DataError) as excinfo:
        load_idx_dataset(tmp_path)
    assert_one_line_data_error(excinfo, "5 images", "4 labels")


def test_load_idx_dataset_rejects_train_and_test_images_of_different_size(tmp_path):
    write_mnist_set(tmp_path)
    write_idx(tmp_path / STEMS[2], np.zeros((3, 5, 5), dtype=np.uint8))
    with pytest.raises(DataError) as excinfo:
        load_idx_dataset(tmp_path)
    assert_one_line_data_error(excinfo, "(4, 3)", "(5, 5)")


def test_load_idx_dataset_rejects_labels_file_holding_images(tmp_path):
    write_mnist_set(tmp_path)
    write_idx(tmp_path / STEMS[1], np.zeros((5, 2), dtype=np.uint8))
    with pytest.raises(DataError) as excinfo:
        load_idx_dataset(tmp_path)
    assert_one_line_data_error(excinfo, STEMS[1], "labels of shape (N,)")


def test_load_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(DataError) as excinfo:
        load_fashion_mnist(tmp_path)
    assert_one_line_data_error(
        excinfo, str(tmp_path), "apt-get install dataset-fashion-mnist", "data.path"
    )


def test_load_fashion_mnist_reads_idx_files_from_given_directory(tmp_path):
    write_mnist_set(tmp_path, suffix=".gz")
    dataset = load_fashion_mnist(tmp_path)
    assert dataset.name == "fashion-mnist"
    assert dataset.train_x.shape == (5, 1, 4, 3)


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="Fashion-MNIST is not installed")
def test_real_fashion_mnist_has_60000_train_and_10000_test_images_of_1x28x28():
    dataset = load_fashion_mnist()
    assert dataset.train_x.shape == (60000, 1, 28, 28)
    assert dataset.test_x.shape == (10000, 1, 28, 28)
    assert dataset.train_y.shape == (60000,) and dataset.test_y.shape == (10000,)
    assert dataset.n_classes == 10
    assert 0.0 <= dataset.train_x.min() and dataset.train_x.max() <= 1.0
    assert torch.bincount(dataset.train_y).tolist() == [6000] * 10


# --- digits -----------------------------------------------------------------


def test_digits_are_1x8x8_images_in_unit_interval_with_ten_classes():
    dataset = load_digits()
    assert dataset.task == "classification" and dataset.n_classes == 10
    assert dataset.input_shape == (1, 8, 8)
    assert len(dataset.train_x) + len(dataset.test_x) == 1797
    assert len(dataset.test_x) == pytest.approx(0.25 * 1797, abs=1)
    assert dataset.train_x.dtype == torch.float32 and dataset.train_y.dtype == torch.int64
    assert dataset.train_x.min() == 0.0 and dataset.train_x.max() == 1.0
    assert set(dataset.test_y.tolist()) == set(range(10))


def test_digits_split_is_deterministic_per_seed_and_differs_between_seeds():
    first, again, other = load_digits(seed=3), load_digits(seed=3), load_digits(seed=4)
    assert torch.equal(first.train_x, again.train_x) and torch.equal(first.test_y, again.test_y)
    assert not torch.equal(first.train_x, other.train_x)


def test_digits_split_is_stratified():
    dataset = load_digits()
    train_share = torch.bincount(dataset.train_y) / len(dataset.train_y)
    test_share = torch.bincount(dataset.test_y) / len(dataset.test_y)
    assert torch.allclose(train_share, test_share, atol=0.01)


# --- sunspots ---------------------------------------------------------------


def test_sunspots_is_regression_with_12_lag_inputs(sunspots):
    assert sunspots.task == "regression" and sunspots.n_classes is None
    assert sunspots.input_shape == (12,)
    assert sunspots.train_x.dtype == torch.float32 and sunspots.train_y.dtype == torch.float32
    assert sunspots.train_y.shape == (1920 - 1712 + 1,)


def test_sunspots_splits_by_target_year(sunspots):
    series = torch.tensor(scaled_sunspots(), dtype=torch.float32)
    extra_x, extra_y = sunspots.extra_tests["1956-1979"]
    assert list(sunspots.extra_tests) == ["1956-1979"]
    assert len(sunspots.test_y) == 35 and len(extra_y) == 24
    assert sunspots.train_y[-1] == series[1920 - 1700]
    assert torch.equal(sunspots.test_y, series[1921 - 1700 : 1955 - 1700 + 1])
    assert torch.equal(extra_y, series[1956 - 1700 :])
    assert torch.equal(extra_x[-1], series[1979 - 1700 - 12 : 1979 - 1700])


def test_sunspots_values_are_scaled_into_unit_interval_with_maximum_one(sunspots):
    values = torch.cat([sunspots.train_x.flatten(), sunspots.train_y, sunspots.test_y])
    assert values.min() >= 0.0 and values.max() <= 1.0
    extra_y = sunspots.extra_tests["1956-1979"][1]
    all_targets = torch.cat([sunspots.train_y, sunspots.test_y, extra_y])
    assert all_targets.max() == 1.0


def test_sunspots_first_train_row_holds_first_12_scaled_values(sunspots):
    series = torch.tensor(scaled_sunspots(), dtype=torch.float32)
    assert torch.equal(sunspots.train_x[0], series[:12])
    assert sunspots.train_y[0] == series[12]


def test_sunspots_target_variance_is_variance_of_scaled_series(sunspots):
    assert sunspots.target_variance == pytest.approx(float(np.var(scaled_sunspots())))


def test_sunspots_lags_set_input_width_and_train_start():
    dataset = load_sunspots(lags=3)
    assert dataset.input_shape == (3,)
    assert len(dataset.train_y) == 1920 - 1703 + 1
    assert len(dataset.test_y) == 35


# --- Dataset ----------------------------------------------------------------


def test_dataset_to_moves_every_tensor_including_extra_tests(sunspots):
    moved = sunspots.to("meta")
    extra = moved.extra_tests["1956-1979"]
    tensors = [moved.train_x, moved.train_y, moved.test_x, moved.test_y, *extra]
    assert all(tensor.device.type == "meta" for tensor in tensors)
    assert sunspots.train_x.device.type == "cpu"
    assert moved.target_variance == sunspots.target_variance


def test_dataset_rejects_n_classes_on_regression():
    x, y = torch.zeros(2, 3), torch.zeros(2)
    with pytest.raises(ValueError):
        Dataset(name="d", task="regression", train_x=x, train_y=y, test_x=x, test_y=y, n_classes=2)


def test_dataset_rejects_inputs_and_targets_of_different_length():
    x, y = torch.zeros(2, 3), torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError):
        Dataset(
            name="d", task="classification", train_x=x, train_y=y, test_x=x, test_y=y, n_classes=2
        )


# --- load_dataset -----------------------------------------------------------


def test_load_dataset_dispatches_builtin_names():
    assert load_dataset("digits", seed=5).test_y.equal(load_digits(seed=5).test_y)
    assert load_dataset("sunspots").task == "regression"


def test_load_dataset_idx_and_fashion_mnist_read_given_path(tmp_path):
    write_mnist_set(tmp_path)
    assert load_dataset("idx", path=str(tmp_path)).name == "idx"
    assert load_dataset("fashion-mnist", path=str(tmp_path)).name == "fashion-mnist"


def test_load_dataset_unknown_name_lists_known_names():
    with pytest.raises(DataError) as excinfo:
        load_dataset("cifar")
    assert_one_line_data_error(excinfo, "'cifar'", *DATASET_NAMES)


def test_load_dataset_idx_without_path_raises_data_error():
    with pytest.raises(DataError) as excinfo:
        load_dataset("idx")
    assert_one_line_data_error(excinfo, "data.path")


def test_load_dataset_builtin_with_path_raises_data_error(tmp_path):
    with pytest.raises(DataError) as excinfo:
        load_dataset("digits", path=str(tmp_path))
    assert_one_line_data_error(excinfo, "'digits'", "data.path")


# --- batches ----------------------------------------------------------------


@pytest.mark.parametrize(("n", "batch_size"), [(10, 3), (9, 3), (5, 8), (0, 4)])
def test_batches_cover_each_index_exactly_once(n, batch_size):
    parts = list(batches(n, batch_size=batch_size, generator=torch.Generator().manual_seed(0)))
    assert all(len(part) == batch_size for part in parts[:-1])
    assert len(parts) == -(-n // batch_size)
    covered = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
    assert sorted(covered.tolist()) == list(range(n))
    assert covered.dtype == torch.int64


def test_batches_shuffle_is_reproducible_with_generator_and_differs_between_epochs():
    generator = torch.Generator().manual_seed(1)
    epoch1 = torch.cat(list(batches(100, batch_size=32, generator=generator)))
    epoch2 = torch.cat(list(batches(100, batch_size=32, generator=generator)))
    replay_generator = torch.Generator().manual_seed(1)
    replay = torch.cat(list(batches(100, batch_size=32, generator=replay_generator)))
    assert torch.equal(epoch1, replay)
    assert not torch.equal(epoch1, epoch2)


def test_batches_without_shuffle_are_in_order():
    parts = batches(7, batch_size=3, shuffle=False)
    assert [part.tolist() for part in parts] == [[0, 1, 2], [3, 4, 5], [6]]


def test_batches_rejects_non_positive_batch_size():
    with pytest.raises(ValueError):
        batches(5, batch_size=0)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_split_with_non_finite_values_is_refused(value):
    from bayes_sws.errors import DataError

    x = torch.zeros(4, 2)
    x[1, 0] = value
    with pytest.raises(DataError, match="'train' has non-finite inputs"):
        Dataset(name="bad", task="classification", train_x=x, train_y=torch.zeros(4, dtype=torch.long),
                test_x=torch.zeros(2, 2), test_y=torch.zeros(2, dtype=torch.long), n_classes=2)


def test_a_validation_split_is_seeded_disjoint_and_sequential_for_a_series():
    digits = load_digits()
    first, again = digits.with_validation(0.1, seed=3), digits.with_validation(0.1, seed=3)
    assert torch.equal(first.valid_x, again.valid_x)
    assert first.train_x.shape[0] + first.valid_x.shape[0] == digits.train_x.shape[0]
    assert not torch.equal(first.valid_x, digits.with_validation(0.1, seed=4).valid_x)
    rows = {tuple(row.flatten().tolist()) for row in first.train_x}
    assert not any(tuple(row.flatten().tolist()) in rows for row in first.valid_x[:20])
    sunspots = load_sunspots().with_validation(0.1)
    assert torch.equal(sunspots.valid_y, load_sunspots().train_y[-sunspots.valid_y.shape[0]:])


def test_splitting_a_dataset_that_has_a_validation_split_again_is_refused():
    split = load_digits().with_validation(0.1)
    with pytest.raises(ValueError, match="validation split already"):
        split.with_validation(0.0)
