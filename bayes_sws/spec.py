"""Model specifications: a TOML file naming the data, network, prior and inference settings.

A specification is validated as a whole on load: an unknown key, a value of the
wrong type or an invalid setting raises :class:`~bayes_sws.errors.SpecError`
naming the key. ``overrides`` (the CLI's ``--set key=value``) are applied first.

Example (``models/digits.toml``)::

    name = "digits-mlp"
    [data]
    dataset = "digits"
    [network]
    architecture = "mlp"
    hidden = [64]
    [prior]
    weight = 0.03
    n_components = 8
    [inference]
    epochs = 40
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SpecError

__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURES",
    "BACKENDS",
    "COMPRESSION_METHODS",
    "CompressionSpec",
    "DATASET_NAMES",
    "METHODS",
    "OPTIMIZERS",
    "DataSpec",
    "Hyperpriors",
    "InferenceSpec",
    "MIXTURE_GUIDES",
    "NUTSSpec",
    "VISpec",
    "LikelihoodSpec",
    "LearningRates",
    "MixtureSpec",
    "NetworkSpec",
    "PriorSpec",
    "Spec",
    "apply_overrides",
    "bundled_specs",
    "load_spec",
    "parse_spec",
]

# The names a specification may use. The modules that act on them (data, nets,
# kernels, inference) keep their own lists; tests/test_spec.py checks they agree.
DATASET_NAMES = ("digits", "fashion-mnist", "idx", "sunspots")
ARCHITECTURES = ("mlp", "lenet5")
ACTIVATIONS = ("relu", "tanh", "sigmoid")
OPTIMIZERS = ("adam", "lbfgs", "cg")
BACKENDS = ("auto", "torch", "compile", "native")
METHODS = ("map", "nuts", "vi")
MIXTURE_GUIDES = ("full", "lowrank", "diagonal")
COMPRESSION_METHODS = ("sws", "dc", "prune")

_INLINE = {"inline": True}
_MAX_NAME_LENGTH = 200
_MAX_SPEC_BYTES = 1 << 20


@dataclass(frozen=True)
class Hyperpriors:
    """Optional hyperpriors on the mixture parameters; ``None`` means flat (improper).

    Flat hyperpriors suit MAP fitting; sampling (``Predictive``, MCMC, guides
    initialised from the prior) needs proper ones (see docs/tuning.md).

    Attributes
    ----------
    dirichlet : float, optional
        π over the learned components ~ Dirichlet(α, …, α).
    means_scale : float, optional
        μ_j ~ Normal(0, means_scale).
    precision_gamma : (float, float), optional
        1/σ_j² ~ Gamma(shape, rate) for every component.
    zero_precision_gamma : (float, float), optional
        The zero component's own Gamma(shape, rate); needs ``precision_gamma``.
    zero_proportion_beta : (float, float), optional
        π0 ~ Beta(a, b) when the zero component's mixing proportion is learned.
    """

    dirichlet: float | None = None
    means_scale: float | None = None
    precision_gamma: tuple[float, float] | None = None
    zero_precision_gamma: tuple[float, float] | None = None
    zero_proportion_beta: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
            if value is not None and not all(0 < v < math.inf for v in values):
                raise ValueError(f"hyperprior {f.name} must be positive and finite, got {value}")
        if self.zero_precision_gamma is not None and self.precision_gamma is None:
            raise ValueError("hyperprior zero_precision_gamma needs precision_gamma too")


@dataclass(frozen=True)
class MixtureSpec:
    """The configuration of a soft weight-sharing mixture: components, zero component, start.

    :class:`~bayes_sws.prior.SoftWeightSharingPrior` adds the Pyro sites and the
    EM update to these settings.

    Attributes
    ----------
    n_components : int
        J, including the zero component.
    zero_component : bool
        Component 0 has μ0 = 0 fixed (the pruning component).
    pi_zero : float, optional
        Fixed π0; ``None`` learns it (with ``hyperpriors.zero_proportion_beta`` if given).
    init_means : (float, float), optional
        Learned means start evenly spaced over this range; by default over the
        range of the initial weights.
    init_scale : float
        Starting σ of every component.
    hyperpriors : Hyperpriors

    Examples
    --------
    >>> MixtureSpec(n_components=17, pi_zero=0.999,
    ...     hyperpriors=Hyperpriors(precision_gamma=(250, 0.1), zero_precision_gamma=(5000, 2)))
    """

    n_components: int = 16
    zero_component: bool = True
    pi_zero: float | None = None
    init_means: tuple[float, float] | None = None
    init_scale: float = 0.25
    hyperpriors: Hyperpriors = field(default_factory=Hyperpriors)

    def __post_init__(self) -> None:
        if self.n_components < 1:
            raise ValueError(f"n_components must be at least 1, got {self.n_components}")
        if not 0 < self.init_scale < math.inf:
            raise ValueError(f"init_scale (σ) must be positive, got {self.init_scale}")
        if self.pi_zero is not None:
            if not self.zero_component:
                raise ValueError("pi_zero is set but zero_component is false")
            if self.n_components == 1:
                raise ValueError("pi_zero needs at least two components (with one, the zero component has all the weight)")
            if not 0 < self.pi_zero < 1:
                raise ValueError(f"pi_zero must lie in (0, 1), got {self.pi_zero}")
        if self.init_means is not None and not self.init_means[0] < self.init_means[1]:
            raise ValueError(f"init_means must be an increasing pair, got {self.init_means}")


@dataclass(frozen=True)
class LearningRates:
    """Learning rate of each parameter group (Adam); ``weights`` also covers pass-through parameters.

    The defaults follow Ullrich et al.'s public code.
    """

    weights: float = 5e-4
    means: float = 1e-4
    precisions: float = 3e-3
    pi: float = 3e-3

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"learning rate for {name} must be positive, got {value}")

    @property
    def mixture(self) -> float:
        """The rate of a joint variational guide over the mixture sites (full- or low-rank, under VI).

        Its one location and scale cover π, μ and 1/σ² together, so it takes the
        slowest of their three rates: the step every site it moves can stand.
        """
        return min(self.means, self.precisions, self.pi)


@dataclass(frozen=True)
class DataSpec:
    """``[data]``: ``dataset`` is one of digits, fashion-mnist, idx, sunspots; ``path`` a directory.

    ``validation_fraction`` of the training examples (seeded by the spec's ``seed``;
    the last years for the sunspot series) form a validation split for model
    selection, evaluated every epoch; 0 keeps them all for training.
    ``held_out_class`` (classification) removes that class from every split: the
    fit never sees it, and its test images serve ``bayes-sws diagnose`` as an
    out-of-distribution set.
    """

    dataset: str = "digits"
    path: str | None = None
    validation_fraction: float = 0.0
    held_out_class: int | None = None

    def __post_init__(self) -> None:
        if self.dataset not in DATASET_NAMES:
            raise ValueError(f"dataset must be one of {', '.join(DATASET_NAMES)}, got {self.dataset!r}")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must lie in [0, 1), got {self.validation_fraction}")
        if self.held_out_class is not None and self.held_out_class < 0:
            raise ValueError(f"held_out_class must be a class index (>= 0), got {self.held_out_class}")


@dataclass(frozen=True)
class LikelihoodSpec:
    """``[likelihood]``, regression only: the observation noise s of y ~ Normal(network(x), s²).

    ``noise_scale`` fixes s; unset, s is learned with the proper prior
    s ~ HalfNormal(``noise_prior_scale``), so ``Predictive`` and NUTS can sample it.
    """

    noise_scale: float | None = None
    noise_prior_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("noise_scale", "noise_prior_scale"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise ValueError(f"{name} must be positive and finite, got {value}")


@dataclass(frozen=True)
class NetworkSpec:
    """``[network]``: an ``mlp`` with ``hidden`` layer sizes, or ``lenet5`` (LeNet-5-Caffe)."""

    architecture: str = "mlp"
    hidden: tuple[int, ...] = (64,)
    activation: str = "relu"

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if any(size < 1 for size in self.hidden):
            raise ValueError(f"hidden layer sizes must be positive, got {list(self.hidden)}")


@dataclass(frozen=True)
class PriorSpec:
    """``[prior]``: λ (``weight``), sharing, and the mixture (the keys of :class:`MixtureSpec`)."""

    weight: float = 1e-3
    shared: bool = True
    include_biases: bool = False
    mixture: MixtureSpec = field(default_factory=MixtureSpec, metadata=_INLINE)

    def __post_init__(self) -> None:
        if not self.weight >= 0:  # finiteness is checked when the value is read
            raise ValueError(f"weight (λ) must be non-negative, got {self.weight}")


@dataclass(frozen=True)
class VISpec:
    """``[inference.vi]``: the variational stage of ``method = "vi"`` (see :func:`~bayes_sws.inference.fit_vi`).

    The MAP fit the ``[inference]`` table describes runs first; VI starts from its
    point and runs ``epochs`` more epochs with these settings (batch size as for MAP).
    """

    epochs: int = 20
    num_particles: int = 1
    init_scale: float = 1e-2
    mixture_guide: str = "full"
    local_reparameterization: bool = False
    learning_rates: LearningRates = field(default_factory=lambda: LearningRates(
        weights=1e-3, means=1e-3, precisions=1e-2, pi=1e-2))

    def __post_init__(self) -> None:
        for name in ("epochs", "num_particles"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.init_scale < math.inf:
            raise ValueError(f"init_scale must be positive, got {self.init_scale}")
        if self.mixture_guide not in MIXTURE_GUIDES:
            raise ValueError(f"mixture_guide must be one of {', '.join(MIXTURE_GUIDES)}, got {self.mixture_guide!r}")


@dataclass(frozen=True)
class NUTSSpec:
    """``[inference.nuts]``: the sampling stage of ``method = "nuts"`` (see :func:`~bayes_sws.inference.fit_nuts`).

    The MAP fit the ``[inference]`` table describes runs first; every chain starts
    from its point. ``draws`` per chain are kept after ``warmup`` adaptation steps.
    """

    num_chains: int = 2
    warmup: int = 200
    draws: int = 200
    max_tree_depth: int = 8
    target_accept_prob: float = 0.8

    def __post_init__(self) -> None:
        for name in ("num_chains", "warmup", "draws", "max_tree_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.target_accept_prob < 1:
            raise ValueError(f"target_accept_prob must lie in (0, 1), got {self.target_accept_prob}")


@dataclass(frozen=True)
class InferenceSpec:
    """``[inference]``: the fitting method and its settings (see :func:`~bayes_sws.inference.fit_map`).

    The settings here describe the MAP fit; ``method = "vi"`` and ``"nuts"`` run that
    MAP fit first and continue from its point with ``[inference.vi]`` / ``[inference.nuts]``.
    """

    method: str = "map"
    optimizer: str = "adam"
    epochs: int = 20
    batch_size: int = 128
    pretrain_epochs: int = 0
    iterations_per_epoch: int = 20
    em_every: int = 0
    kernels: str = "auto"
    learning_rates: LearningRates = field(default_factory=LearningRates)
    vi: VISpec = field(default_factory=VISpec)
    nuts: NUTSSpec = field(default_factory=NUTSSpec)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        for name in ("epochs", "batch_size", "iterations_per_epoch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.kernels not in BACKENDS:
            raise ValueError(f"kernels must be one of {', '.join(BACKENDS)}, got {self.kernels!r}")
        for name in ("pretrain_epochs", "em_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")


@dataclass(frozen=True)
class CompressionSpec:
    """``[compression]``: ``bayes-sws compress`` settings (see :mod:`bayes_sws.compression`).

    Soft weight-sharing retrains ``inference.epochs`` with the prior at λ = ``prior.weight``
    (Ullrich's τ), merges components closer than ``merge_threshold`` (KL divergence),
    quantises, then fine-tunes the codebooks ``finetune_epochs``. Deep Compression (``dc``)
    prunes the smallest ``prune_fraction`` of each layer's weights by magnitude, retrains
    ``inference.epochs`` with them held at zero, clusters each layer by k-means
    (``fc_clusters`` / ``conv_clusters`` centres including zero) and fine-tunes the
    centres ``finetune_epochs``; ``prune`` prunes and retrains ``inference.epochs +
    finetune_epochs``, keeping float32 values. Every method gets the same epochs.
    ``fold_dead_units`` zeroes, at the end, the weights of units that are switched
    off or never read (:func:`bayes_sws.compression.fold_dead_units`; exact).
    """

    method: str = "sws"
    merge_threshold: float = 1e-2
    finetune_epochs: int = 2
    finetune_learning_rate: float = 1e-4
    prune_fraction: float = 0.95
    fc_clusters: int = 32
    conv_clusters: int = 256
    fold_dead_units: bool = True

    def __post_init__(self) -> None:
        if self.method not in COMPRESSION_METHODS:
            raise ValueError(f"method must be one of {', '.join(COMPRESSION_METHODS)}, got {self.method!r}")
        if not self.merge_threshold >= 0:
            raise ValueError(f"merge_threshold must be non-negative, got {self.merge_threshold}")
        if self.finetune_epochs < 0:
            raise ValueError(f"finetune_epochs must be non-negative, got {self.finetune_epochs}")
        if not self.finetune_learning_rate > 0:
            raise ValueError(f"finetune_learning_rate must be positive, got {self.finetune_learning_rate}")
        if not 0 <= self.prune_fraction < 1:
            raise ValueError(f"prune_fraction must lie in [0, 1), got {self.prune_fraction}")
        for name in ("fc_clusters", "conv_clusters"):
            if not 2 <= getattr(self, name) <= 65536:
                raise ValueError(f"{name} must lie in [2, 65536], got {getattr(self, name)}")


@dataclass(frozen=True)
class Spec:
    """A whole model specification."""

    name: str
    description: str = ""
    seed: int = 0
    data: DataSpec = field(default_factory=DataSpec)
    network: NetworkSpec = field(default_factory=NetworkSpec)
    prior: PriorSpec = field(default_factory=PriorSpec)
    likelihood: LikelihoodSpec = field(default_factory=LikelihoodSpec)
    inference: InferenceSpec = field(default_factory=InferenceSpec)
    compression: CompressionSpec = field(default_factory=CompressionSpec)

    def __post_init__(self) -> None:
        _check_name(self.name)
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must lie in [0, 2**32), got {self.seed}")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (the inline mixture flattened into ``prior``), as in the TOML file."""
        return _to_table(self)


def _check_name(name: str) -> None:
    """A run's name becomes a directory name (``runs/<name>``): one plain path component."""
    if not name or name in (".", "..") or len(name) > _MAX_NAME_LENGTH:
        raise ValueError(f"name {name!r} must be a plain file name of 1 to {_MAX_NAME_LENGTH} characters")
    if any(c in "/\\:" or not c.isprintable() for c in name):
        raise ValueError(f"name {name!r} must be a plain file name: no path separators (/ \\ :), "
                         "control or NUL characters")


def _to_table(obj: Any) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            nested = _to_table(value)
            table.update(nested) if f.metadata.get("inline") else table.__setitem__(f.name, nested)
        elif value is not None:
            table[f.name] = list(value) if isinstance(value, tuple) else value
    return table


# --------------------------------------------------------------------------- building


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a (simple) type annotation; return it in the annotated form."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is tuple:
        if not isinstance(value, list):
            raise SpecError(f"{key}: expected a list, got {value!r}")
        if args[-1] is not Ellipsis and len(value) != len(args):
            raise SpecError(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, args[0], key) for v in value)
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise SpecError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise SpecError(f"{key}: expected true or false, got {value!r}")
    if annotation is int and isinstance(value, bool):
        raise SpecError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, annotation):
        raise SpecError(f"{key}: expected {annotation.__name__}, got {value!r}")
    return value


def _build(cls: type, table: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a TOML table, rejecting unknown keys and invalid values."""
    where = prefix.rstrip(".") or "the specification"
    if not isinstance(table, dict):
        raise SpecError(f"{where}: expected a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    inline = {name: f for name, f in fields.items() if f.metadata.get("inline")}
    inline_keys = {
        key for f in inline.values() for key in (g.name for g in dataclasses.fields(hints[f.name]))
    }
    for key in table:
        if key not in fields and key not in inline_keys or key in inline:
            known = sorted((set(fields) - set(inline)) | inline_keys)
            raise SpecError(f"unknown key {prefix}{key!r} (known: {', '.join(known)})")
    kwargs = {}
    for name, f in fields.items():
        annotation = hints[name]
        if name in inline:
            sub_keys = {g.name for g in dataclasses.fields(annotation)}
            kwargs[name] = _build(annotation, {k: v for k, v in table.items() if k in sub_keys}, prefix)
        elif dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, table.get(name, {}), f"{prefix}{name}.")
        elif name in table:
            kwargs[name] = _coerce(table[name], annotation, f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpecError(f"missing key {prefix}{name}")
    try:
        return cls(**kwargs)
    except ValueError as error:
        raise SpecError(f"{where}: {error}") from None


def parse_spec(table: dict[str, Any]) -> Spec:
    """Validate a specification given as a nested dict (a parsed TOML document).

    Raises
    ------
    SpecError
        On an unknown key, a wrong type or an invalid value; the message names the key.
    """
    return _build(Spec, table, "")


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text
    except RecursionError:
        raise SpecError(f"override value {text[:40]!r}... is nested too deeply") from None


def apply_overrides(table: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``table`` with ``key.path=value`` overrides applied.

    Values are read as TOML (``0.01``, ``true``, ``[300, 100]``); anything that is
    not valid TOML is taken as a string (``data.path=/data/mnist``).

    >>> apply_overrides({"prior": {"weight": 1.0}}, ["prior.weight=0.5"])
    {'prior': {'weight': 0.5}}
    """
    table = _deep_copy(table)
    for override in overrides:
        key, separator, text = override.partition("=")
        if not separator or not key.strip():
            raise SpecError(f"override {override!r} is not of the form key=value")
        *parents, leaf = key.strip().split(".")
        node = table
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SpecError(f"override {override!r}: {part!r} is not a table")
        node[leaf] = _parse_value(text.strip())
    return table


def _deep_copy(table: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in table.items()}


def _bundled_spec_files() -> list[Path]:
    try:  # installed: the package's copy of models/
        entries = importlib.resources.files("bayes_sws.models").iterdir()
    except ModuleNotFoundError:  # a source checkout on sys.path
        directory = Path(__file__).resolve().parents[1] / "models"
        entries = directory.iterdir() if directory.is_dir() else []
    return [Path(entry) for entry in entries if entry.name.endswith(".toml")]


def bundled_specs() -> dict[str, Path]:
    """The ready specifications shipped with the package (the repository's ``models/``), by name.

    Examples
    --------
    >>> sorted(bundled_specs())[:2]
    ['digits', 'digits-nuts']
    """
    return dict(sorted((path.stem, path) for path in _bundled_spec_files()))


def _resolve_spec_path(path: Path) -> Path:
    """``path`` itself where it exists; else a bundled specification named by ``NAME``, ``NAME.toml`` or ``models/NAME.toml``."""
    if path.exists() or path.is_absolute() or str(path.parent) not in (".", "models") \
            or path.suffix not in ("", ".toml"):
        return path
    return bundled_specs().get(path.stem, path)


def load_spec(path: str | os.PathLike[str], *, overrides: list[str] = ()) -> Spec:
    """Read, override and validate a TOML specification file.

    A relative ``NAME``, ``NAME.toml`` or ``models/NAME.toml`` that does not exist
    names a bundled specification (:func:`bundled_specs`), so ``load_spec("digits")``
    and ``bayes-sws fit models/digits.toml`` work outside a checkout too.

    Parameters
    ----------
    path : path-like
        The ``.toml`` file, or a bundled specification's name.
    overrides : list of str
        ``key.path=value`` settings applied before validation.

    Returns
    -------
    Spec
    """
    path = _resolve_spec_path(Path(path))
    try:
        if not path.exists():
            raise SpecError(f"specification {path} not found (bundled: {', '.join(bundled_specs())})")
        if not path.is_file():  # a FIFO or device would block or never end
            raise SpecError(f"specification {path} is not a regular file")
        with path.open("rb") as handle:
            content = handle.read(_MAX_SPEC_BYTES + 1)
        if len(content) > _MAX_SPEC_BYTES:
            raise SpecError(f"specification {path} is larger than {_MAX_SPEC_BYTES // 1024} KiB")
        table = tomllib.loads(content.decode("utf-8"))
        table.setdefault("name", path.stem)
        return parse_spec(apply_overrides(table, list(overrides)))
    except (OSError, UnicodeDecodeError) as error:
        raise SpecError(f"cannot read specification {path}: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise SpecError(f"specification {path} is not valid TOML: {error}") from None
    except RecursionError:
        raise SpecError(f"specification {path} (or an override) is nested too deeply") from None
