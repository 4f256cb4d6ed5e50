"""Compressing a network: soft weight-sharing (Ullrich et al. 2017) and the baselines.

:func:`compress` runs one method end to end on a specification:

* ``"sws"``: pretrain without the prior, retrain ``inference.epochs`` with the
  compression prior at λ = ``prior.weight`` (Ullrich's τ), merge components whose
  symmetric KL divergence is below ``compression.merge_threshold``, set each weight to
  the mean of its most responsible component (the zero component's weights to exact
  zero), then fine-tune the codebooks (:func:`finetune_codebooks`);
* ``"dc"``: Deep Compression (Han et al. 2016): prune each layer's smallest
  ``prune_fraction`` of weights by magnitude, retrain with them held at zero, share
  weights by k-means per layer (linear initialisation), fine-tune the centres;
* ``"prune"``: magnitude pruning and retraining alone (float32 values kept).

Every method ends with :func:`fold_dead_units`: the weights of units that are switched
off (no non-zero incoming weight; their constant output moves into the next layer's
bias) or never read are set to zero. It is exact (outputs change by float round-off in
the folded biases); ``compression.fold_dead_units = false`` leaves it out.

The retraining runs in the library's fit loop (:func:`~bayes_sws.inference.fit_map`);
every method gets ``inference.epochs + compression.finetune_epochs`` epochs after
pretraining. The result holds a :class:`~bayes_sws.codec.QuantisedNetwork`, which
:func:`save_compression` writes as a compressed file with ``compression.json`` and a
figure.

    >>> from bayes_sws import load_spec
    >>> from bayes_sws.compression import compress, save_compression
    >>> result = compress(load_spec("models/fashion-lenet-300-100.toml"))
    >>> report = save_compression(result, out_dir="runs/compressed")
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import plots
from .codec import QuantisedLayer, QuantisedNetwork, encode_compressed, storage_report
from .data import Dataset, load_dataset
from .errors import BayesSWSError
from .experiment import build_model, resolve_device
from .fitting import Callback, FitState
from .inference import fit_map, write_point
from .kernels import use_backend
from .model import SoftWeightSharingModel
from .prior import GaussianMixture, responsibilities
from .spec import Spec, parse_spec

__all__ = [
    "CompressionLog",
    "CompressionResult",
    "KeepPruned",
    "accuracy",
    "choose_on_validation",
    "compress",
    "finetune_codebooks",
    "fold_dead_units",
    "kmeans_centres",
    "layer_from_values",
    "load_compressed_data",
    "magnitude_masks",
    "merge_components",
    "pretrained_model",
    "quantise_to_components",
    "save_compression",
    "sweep_prior_weight",
]

FILE_NAME = "model.sws"


# --------------------------------------------------------------------------- merging and quantising


def _symmetric_kl(means: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
    """½(KL(i‖j) + KL(j‖i)) between every pair of 1-d Gaussians, ``(J, J)``."""
    vi, vj = variances[:, None], variances[None, :]
    squared = (means[:, None] - means[None, :]) ** 2
    return 0.25 * ((vi + squared) / vj + (vj + squared) / vi) - 0.5


def merge_components(mixture: GaussianMixture, *, threshold: float, zero_component: bool = True) -> GaussianMixture:
    """Merge, closest pair first, components whose symmetric KL divergence is below ``threshold``.

    A merged component keeps the pair's total π and matches its mean and variance;
    the zero component stays at index 0 with mean exactly 0.

    Parameters
    ----------
    mixture : GaussianMixture with fields ``(J,)``
    threshold : float
    zero_component : bool
        Component 0 is the zero component.

    Returns
    -------
    GaussianMixture with fields ``(J',)``, J' ≤ J.
    """
    pi = mixture.proportions.detach().double().clone()
    means = mixture.means.detach().double().clone()
    variances = mixture.scales.detach().double().pow(2)
    while len(pi) > 1:
        divergence = _symmetric_kl(means, variances) + torch.diag(torch.full_like(pi, math.inf))
        flat = int(torch.argmin(divergence))
        i, j = sorted(divmod(flat, len(pi)))
        if not divergence[i, j] < threshold:
            break
        total = pi[i] + pi[j]
        mean = (pi[i] * means[i] + pi[j] * means[j]) / total
        second = (pi[i] * (variances[i] + means[i] ** 2) + pi[j] * (variances[j] + means[j] ** 2)) / total
        if zero_component and i == 0:
            mean = torch.zeros_like(mean)
        pi[i], means[i], variances[i] = total, mean, (second - mean**2).clamp_min(1e-12)
        keep = torch.arange(len(pi)) != j
        pi, means, variances = pi[keep], means[keep], variances[keep]
    dtype = mixture.means.dtype
    return GaussianMixture(pi.log().to(dtype), means.to(dtype), variances.sqrt().to(dtype))


def quantise_to_components(weights: torch.Tensor, mixture: GaussianMixture, *,
                           zero_component: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Each weight's most responsible component and the value it becomes (its mean).

    Parameters
    ----------
    weights : Tensor, any shape
    mixture : GaussianMixture with fields ``(J,)``
    zero_component : bool
        Weights of component 0 become exact zeros.

    Returns
    -------
    components : Tensor of int64, the weights' shape
    values : Tensor, the weights' shape
    """
    components = responsibilities(weights.detach(), mixture.detach()).argmax(-1)
    means = mixture.means.detach().to(weights.dtype)
    if zero_component:
        means = torch.cat([torch.zeros_like(means[:1]), means[1:]])
    return components, means[components]


def layer_from_values(name: str, kind: str, values: torch.Tensor, *, raw: bool = False) -> QuantisedLayer:
    """A :class:`QuantisedLayer` holding exactly these weight values.

    Parameters
    ----------
    name : str
    kind : {"fc", "conv"}
    values : Tensor, the weight's shape
        Few distinct values (quantised), or any values with ``raw=True``.
    raw : bool
        Keep each non-zero value as its own float32 entry.
    """
    flat = values.detach().reshape(-1).to(torch.float32).cpu()
    nonzero = flat != 0
    indices = torch.zeros(flat.shape, dtype=torch.int64)
    if raw:
        codebook = torch.cat([torch.zeros(1), flat[nonzero]])
        indices[nonzero] = torch.arange(1, int(nonzero.sum()) + 1)
    else:
        distinct = torch.unique(flat[nonzero])
        codebook = torch.cat([torch.zeros(1), distinct])
        indices[nonzero] = torch.searchsorted(distinct, flat[nonzero]) + 1
    return QuantisedLayer(name=name, kind=kind, indices=indices.reshape(values.shape), codebook=codebook, raw=raw)


_ELEMENTWISE = (nn.Identity, nn.ReLU, nn.Tanh, nn.Sigmoid)
_MAX_POOLS = {1: nn.MaxPool1d, 2: nn.MaxPool2d}


def _flattens(module: nn.Module) -> bool:
    return isinstance(module, nn.Flatten) and (module.start_dim, module.end_dim) == (1, -1)


def _reads_units(a: nn.Module, b: nn.Module, between: list[nn.Module]) -> bool:
    """Whether input unit (channel) ``i`` of ``b`` is unit ``i`` of ``a`` passed through
    ``between``, every module of which maps a constant unit to the same constant at
    every position: element-wise activations; for a convolution ``a`` also max-pools of
    its dimension, then flattening (channel-major) into a Linear ``b``."""
    if isinstance(a, nn.Linear):
        return (isinstance(b, nn.Linear) and b.in_features == a.out_features
                and all(isinstance(m, _ELEMENTWISE) or _flattens(m) for m in between))
    flat = next((i for i, m in enumerate(between) if _flattens(m)), len(between))
    pool = _MAX_POOLS.get(len(a.kernel_size), ())
    if not (all(isinstance(m, (*_ELEMENTWISE, pool)) for m in between[:flat])
            and all(isinstance(m, _ELEMENTWISE) for m in between[flat + 1:])):
        return False
    if flat < len(between):
        return isinstance(b, nn.Linear) and b.in_features % a.out_channels == 0
    return (isinstance(b, nn.modules.conv._ConvNd) and not b.transposed and b.groups == 1
            and len(b.kernel_size) == len(a.kernel_size) and b.in_channels == a.out_channels)


def _foldable_pairs(network: nn.Module) -> list[tuple[str, str, list[nn.Module]]]:
    """Names of consecutive weight layers ``a → b`` of a Sequential network where ``b``
    reads ``a``'s units (:func:`_reads_units`), and the modules between them. A weight
    layer the network holds twice (applied twice), or whose weight another layer holds
    too, is in no pair; a subclass with its own ``forward`` has no pairs."""
    if not isinstance(network, nn.Sequential) or type(network).forward is not nn.Sequential.forward:
        return []
    children = list(network._modules.items())
    uses = Counter(id(getattr(module, "weight", module)) for _, module in children)
    pairs, previous, between = [], None, []
    for name, module in children:
        weighted = isinstance(module, nn.Linear) or (isinstance(module, nn.modules.conv._ConvNd)
                                                     and not module.transposed)
        if weighted and uses[id(module.weight)] == 1:
            if previous is not None and _reads_units(network._modules[previous], module, between):
                pairs.append((previous, name, between))
            previous, between = name, []
        elif isinstance(module, (*_ELEMENTWISE, *_MAX_POOLS.values(), nn.Flatten)):
            between.append(module)
        else:
            previous, between = None, []
    return pairs


def _pads(module: nn.Module) -> bool:
    if not isinstance(module, nn.modules.conv._ConvNd):
        return False
    return module.padding == "same" if isinstance(module.padding, str) else any(module.padding)


def fold_dead_units(network: nn.Module, layers: list[QuantisedLayer]) -> tuple[list[QuantisedLayer], int]:
    """Zero the weights that cannot change the network's output; the network ends holding them.

    For consecutive layers ``a → b`` of a Sequential network with only activations,
    max-pools and flattening between them, where ``b``'s input units are ``a``'s (a
    Linear layer after a Linear layer, a convolution after one of its dimension, a Linear
    layer after a flattened convolution; not transposed, not applied twice or tied; the
    network not a Sequential subclass with its own ``forward``), two exact
    simplifications, repeated until neither applies:

    * a unit (channel) of ``a`` that ``b`` never reads (all its weights in ``b`` zero)
      gets its incoming weights zeroed;
    * a unit of ``a`` with no non-zero incoming weight outputs the constant
      ``activation(bias)``: its contribution goes into ``b``'s bias and its weights in
      ``b`` become zero. Where ``b`` has no bias, or is a padded convolution (there the
      contribution differs at the borders), only a constant of exactly zero (e.g. a
      ReLU unit with a bias ≤ 0) is folded: it contributes nothing anywhere.

    Outputs change only by float round-off in the folded biases. Soft weight-sharing
    switches off whole units; this removes the weights they leave behind.

    Parameters
    ----------
    network : nn.Module
        Holding the weights of ``layers``; its biases are updated in place.
    layers : list of QuantisedLayer

    Returns
    -------
    layers : list of QuantisedLayer
        The simplified layers, in the same order.
    removed : int
        Non-zero weights set to zero.

    Examples
    --------
    >>> layers, removed = fold_dead_units(network, layers)
    """
    weights = {layer.name: layer.weight.to(torch.float32).clone() for layer in layers}
    modules = dict(network.named_children())
    pairs = [(a, b, between) for a, b, between in _foldable_pairs(network)
             if f"{a}.weight" in weights and f"{b}.weight" in weights]
    before = sum(int((w != 0).sum()) for w in weights.values())
    changed = True
    with torch.no_grad():
        while changed:
            changed = False
            for a, b, between in pairs:
                weight_a, weight_b = weights[f"{a}.weight"], weights[f"{b}.weight"]
                channels = weight_a.shape[0]
                incoming = weight_a.view(channels, -1)
                outgoing = weight_b.view(weight_b.shape[0], channels, -1)
                read = (outgoing != 0).any(2).any(0)
                if (incoming[~read] != 0).any():
                    incoming[~read] = 0
                    changed = True
                dead = read & ~(incoming != 0).any(1)
                if not dead.any():
                    continue
                bias_a, bias_b = modules[a].bias, modules[b].bias
                constant = (bias_a.detach().to("cpu", torch.float32, copy=True) if bias_a is not None
                            else torch.zeros(channels))
                for module in between:
                    if isinstance(module, _ELEMENTWISE):
                        constant = module(constant)
                if bias_b is None or _pads(modules[b]):
                    dead &= constant == 0  # a zero output needs no bias to carry it, padded or not
                    if not dead.any():
                        continue
                else:
                    contribution = (outgoing[:, dead].sum(-1) * constant[dead]).sum(1)
                    bias_b.add_(contribution.to(bias_b))
                outgoing[:, dead] = 0
                changed = True
    simplified = [layer_from_values(layer.name, layer.kind, weights[layer.name], raw=layer.raw) for layer in layers]
    _load_layers(network, simplified)
    return simplified, before - sum(int((w != 0).sum()) for w in weights.values())


def magnitude_masks(weights: dict[str, torch.Tensor], *, fraction: float) -> dict[str, torch.Tensor]:
    """Per layer, ``True`` for weights kept: all but the ``fraction`` smallest in magnitude."""
    masks = {}
    for name, value in weights.items():
        pruned = int(fraction * value.numel())
        if pruned == 0:
            masks[name] = torch.ones_like(value, dtype=torch.bool)
            continue
        threshold = value.detach().abs().reshape(-1).kthvalue(pruned).values
        masks[name] = value.detach().abs() > threshold
    return masks


def kmeans_centres(weights: torch.Tensor, *, k: int, iterations: int = 50) -> torch.Tensor:
    """k-means centres of 1-d values, started evenly over their range (Han et al.'s linear start).

    Parameters
    ----------
    weights : Tensor ``(N,)``
    k : int

    Returns
    -------
    Tensor ``(k',)``, k' ≤ k (empty clusters dropped), sorted.
    """
    values = weights.detach().reshape(-1).double()
    if values.numel() == 0:
        return values.to(weights.dtype)
    centres = torch.linspace(float(values.min()), float(values.max()), k, dtype=values.dtype, device=values.device)
    for _ in range(iterations):
        assignment = (values[:, None] - centres[None, :]).abs().argmin(1)
        counts = torch.bincount(assignment, minlength=len(centres))
        sums = torch.zeros_like(centres).index_add_(0, assignment, values)
        updated = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
        if torch.equal(updated, centres):
            break
        centres = updated
    assignment = (values[:, None] - centres[None, :]).abs().argmin(1)
    return torch.sort(centres[torch.unique(assignment)]).values.to(weights.dtype)


# --------------------------------------------------------------------------- evaluation and fine-tuning


def accuracy(network: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
             parameters: dict[str, torch.Tensor] | None = None, batch_size: int = 2048) -> float:
    """Classification accuracy of a network, optionally with some parameters replaced.

    Parameters
    ----------
    network : nn.Module mapping ``(B, *input_shape)`` to ``(B, classes)``
    x : Tensor ``(M, *input_shape)``
    y : Tensor of int64 ``(M,)``
    parameters : dict, optional
        Values used in place of the network's own (``torch.func.functional_call``).
    """
    training = network.training
    network.eval()
    correct = 0
    try:
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                xb = x[start:start + batch_size]
                outputs = torch.func.functional_call(network, parameters or {}, (xb,), strict=False)
                correct += int((outputs.argmax(-1) == y[start:start + batch_size]).sum())
    finally:
        network.train(training)
    return correct / max(1, x.shape[0])


def finetune_codebooks(
    network: nn.Module,
    layers: list[QuantisedLayer],
    data: Dataset,
    *,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    progress: bool = True,
) -> list[QuantisedLayer]:
    """Train each layer's shared values, assignments and zeros fixed; the network ends holding them.

    Every weight reads its value from its layer's codebook, so the gradient of a
    shared value is the sum of its weights' gradients (Han et al.'s centroid
    fine-tune). The network's other trainable parameters (biases) train too.
    Cross-entropy, Adam, shuffled minibatches drawn from a generator seeded by ``seed``.

    Parameters
    ----------
    network : nn.Module
    layers : list of QuantisedLayer
    data : Dataset
        Training split used.
    epochs : int
        0 returns ``layers`` unchanged (and loads them into the network).
    learning_rate : float
    batch_size : int
    seed : int

    Returns
    -------
    list of QuantisedLayer with the tuned codebooks.
    """
    device = data.train_x.device
    shared = [layer.codebook[1:].clone().to(device).requires_grad_(True) for layer in layers]
    indices = [layer.indices.to(device) for layer in layers]
    names = {layer.name for layer in layers}
    others = [p for name, p in network.named_parameters() if name not in names and p.requires_grad]
    optimizer = torch.optim.Adam([*shared, *others], lr=learning_rate)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    n = data.train_x.shape[0]
    zero = torch.zeros(1, device=device)

    def weights() -> dict[str, torch.Tensor]:
        return {layer.name: torch.cat([zero, values])[index]
                for layer, values, index in zip(layers, shared, indices)}

    network.train()
    for _ in tqdm(range(epochs), disable=not progress, unit="epoch", desc="codebook fine-tune"):
        for batch in torch.randperm(n, generator=generator).to(device).split(batch_size):
            optimizer.zero_grad(set_to_none=True)
            outputs = torch.func.functional_call(network, weights(), (data.train_x[batch],), strict=False)
            nn.functional.cross_entropy(outputs, data.train_y[batch]).backward()
            optimizer.step()
    tuned = [replace(layer, codebook=torch.cat([torch.zeros(1), values.detach().cpu()]))
             for layer, values in zip(layers, shared)]
    _load_layers(network, tuned)
    return tuned


def _load_layers(network: nn.Module, layers: list[QuantisedLayer]) -> None:
    parameters = dict(network.named_parameters())
    with torch.no_grad():
        for layer in layers:
            parameters[layer.name].copy_(layer.weight.to(parameters[layer.name].device))


# --------------------------------------------------------------------------- callbacks


@dataclass
class CompressionLog(Callback):
    """Per epoch of the retraining: the zero component's precision, the fraction of weights
    assigned to it, and the accuracy of the quantised network on ``(x, y)``.

    Adds ``zero_precision``, ``zero_fraction`` and ``{name}_quantised_accuracy`` to the record.
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor
    merge_threshold: float
    zero_component: bool = True

    def on_epoch(self, state: FitState, record: dict) -> None:
        values = state.values
        quantised, zeros, total = {}, 0, 0
        mixtures = state.model.mixtures(values)
        for group, names in state.model.groups.items():
            mixture = merge_components(mixtures[group], threshold=self.merge_threshold,
                                       zero_component=self.zero_component)
            for name in names:
                components, quantised[name] = quantise_to_components(values[name], mixture,
                                                                     zero_component=self.zero_component)
                zeros += int((components == 0).sum())
                total += components.numel()
        first = next(iter(mixtures.values()))
        record["zero_precision"] = float(first.precisions[0])
        record["zero_fraction"] = zeros / total
        record[f"{self.name}_quantised_accuracy"] = accuracy(state.model.network, self.x, self.y, parameters=quantised)


@dataclass
class KeepPruned(Callback):
    """After every optimiser step, set the pruned weights (``masks`` False) back to zero."""

    masks: dict[str, torch.Tensor]

    def on_step(self, state: FitState) -> None:
        values = state.values
        write_point(state.guide, {name: values[name] * mask for name, mask in self.masks.items()})


# --------------------------------------------------------------------------- the pipeline


@dataclass
class CompressionResult:
    """One compression run.

    Attributes
    ----------
    method : {"sws", "dc", "prune"}
    quantised : QuantisedNetwork
        What the compressed file holds.
    network : nn.Module
        The network holding the quantised weights.
    pretrained, retrained : dict of str to Tensor
        Each compressed layer's weights after pretraining and before quantisation.
    assignments : dict of str to Tensor of int64
        Each weight's component (sws) or codebook index (dc, prune), 0 for zero.
    metrics : dict
        ``{split}_accuracy_before`` / ``_quantised`` / ``_after`` (pretrained network,
        quantised before the fine-tune, compressed) for ``valid`` (when present) and ``test``, ``prior_weight``, ``epochs``, ``seconds``,
        ``finetune_epochs``.
    history : list of dict
        The retraining's epoch records.
    mixture : GaussianMixture, optional
        The merged mixture (sws).
    """

    method: str
    quantised: QuantisedNetwork
    network: nn.Module
    pretrained: dict[str, torch.Tensor]
    retrained: dict[str, torch.Tensor]
    assignments: dict[str, torch.Tensor]
    metrics: dict[str, Any]
    history: list[dict] = field(default_factory=list)
    mixture: GaussianMixture | None = None


def _layer_kinds(network: nn.Module) -> dict[str, str]:
    return {f"{module_name}.weight" if module_name else "weight": "conv" if isinstance(module, nn.modules.conv._ConvNd) else "fc"
            for module_name, module in network.named_modules()
            if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))}


def _load_data(spec: Spec, device: torch.device) -> Dataset:
    data = load_dataset(spec.data.dataset, path=spec.data.path, seed=spec.seed)
    return data.with_validation(spec.data.validation_fraction, seed=spec.seed).to(device)


def load_compressed_data(quantised: QuantisedNetwork, *, device: str = "cpu") -> Dataset:
    """The data a compressed file's specification names, split as when it was compressed."""
    return _load_data(parse_spec(quantised.spec), resolve_device(device))


def _splits(data: Dataset) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    splits = {"test": (data.test_x, data.test_y)}
    if data.valid_x is not None and len(data.valid_x):
        splits = {"valid": (data.valid_x, data.valid_y), **splits}
    return splits


def _likelihood_only(model: SoftWeightSharingModel, spec: Spec) -> SoftWeightSharingModel:
    return SoftWeightSharingModel(model.network, prior=model.prior, likelihood=model.likelihood, prior_weight=0.0,
                                  include_biases=spec.prior.include_biases, shared=spec.prior.shared)


def pretrained_model(spec: Spec, data: Dataset, *, network_state: dict[str, torch.Tensor] | None = None,
                     progress: bool = True) -> tuple[SoftWeightSharingModel, float]:
    """The specification's model with its network pretrained (``inference.pretrain_epochs``
    without the prior), or holding ``network_state``; and the seconds it took."""
    model = build_model(spec, input_shape=data.input_shape, task=data.task, n_outputs=data.n_classes or 1,
                        device=data.train_x.device)
    if network_state is not None:
        model.network.load_state_dict(network_state)
        return model, 0.0
    if not spec.inference.pretrain_epochs:
        return model, 0.0
    state = fit_map(_likelihood_only(model, spec), data, epochs=spec.inference.pretrain_epochs,
                    **_fit_settings(spec, progress))
    return model, state.seconds


def _fit_settings(spec: Spec, progress: bool) -> dict[str, Any]:
    settings = spec.inference
    return dict(batch_size=settings.batch_size, optimizer=settings.optimizer, learning_rates=settings.learning_rates,
                iterations_per_epoch=settings.iterations_per_epoch, seed=spec.seed, progress=progress)


def compress(
    spec: Spec,
    *,
    method: str | None = None,
    data: Dataset | None = None,
    network_state: dict[str, torch.Tensor] | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> CompressionResult:
    """Compress the specification's network with one method (see the module's docstring).

    Parameters
    ----------
    spec : Spec
        Its ``[compression]`` table holds the settings; ``prior.weight`` is τ.
    method : {"sws", "dc", "prune"}, optional
        Defaults to ``spec.compression.method``.
    data : Dataset, optional
        Defaults to the specification's data with its validation split, on ``device``.
    network_state : dict, optional
        A pretrained network's ``state_dict``: used instead of pretraining.
    device : str
    progress : bool

    Returns
    -------
    CompressionResult

    Raises
    ------
    BayesSWSError
        For a regression task (compression reports accuracy) or an unknown method.
    """
    method = method or spec.compression.method
    if method not in ("sws", "dc", "prune"):
        raise BayesSWSError(f"compression method must be sws, dc or prune, got {method!r}")
    torch_device = resolve_device(device)
    with use_backend(spec.inference.kernels):
        data = data if data is not None else _load_data(spec, torch_device)
        if data.task != "classification":
            raise BayesSWSError("compression reports accuracy and needs a classification task")
        model, seconds = pretrained_model(spec, data, network_state=network_state, progress=progress)
        return _compress_pretrained(spec, method, model, data, seconds, progress=progress)


def _compress_pretrained(spec: Spec, method: str, model: SoftWeightSharingModel, data: Dataset,
                         pretrain_seconds: float, *, progress: bool) -> CompressionResult:
    settings = spec.compression
    network = model.network
    kinds = _layer_kinds(network)
    names = [name for name in model.prior_sites if name in kinds]
    parameters = dict(network.named_parameters())
    pretrained = {name: parameters[name].detach().clone() for name in names}
    splits = _splits(data)
    metrics: dict[str, Any] = {f"{split}_accuracy_before": accuracy(network, x, y) for split, (x, y) in splits.items()}
    started = time.perf_counter()
    common = _fit_settings(spec, progress)
    mixture = None
    if method == "sws":
        selection = next(iter(splits))
        log = CompressionLog(selection, *splits[selection], merge_threshold=settings.merge_threshold,
                             zero_component=spec.prior.mixture.zero_component)
        state = fit_map(model, data, epochs=spec.inference.epochs, em_every=spec.inference.em_every or None,
                        callbacks=[log], **common)
        values, history = state.values, state.history
        retrained = {name: values[name].detach().clone() for name in names}
        layers, assignments = [], {}
        mixtures = model.mixtures(values)
        for group, members in model.groups.items():
            merged = merge_components(mixtures[group], threshold=settings.merge_threshold,
                                      zero_component=spec.prior.mixture.zero_component)
            mixture = mixture or GaussianMixture(*(t.detach().cpu() for t in merged))
            for name in [m for m in members if m in kinds]:
                assignments[name], quantised = quantise_to_components(values[name], merged,
                                                                      zero_component=spec.prior.mixture.zero_component)
                layers.append(layer_from_values(name, kinds[name], quantised))
        finetune_epochs = settings.finetune_epochs
    else:
        masks = magnitude_masks(pretrained, fraction=settings.prune_fraction)
        retrain_epochs = spec.inference.epochs + (settings.finetune_epochs if method == "prune" else 0)
        state = fit_map(_likelihood_only(model, spec), data, epochs=retrain_epochs,
                        init_values={name: pretrained[name] * masks[name] for name in names},
                        callbacks=[KeepPruned(masks)], **common)
        history = state.history
        retrained = {name: state.values[name].detach() * masks[name] for name in names}
        if method == "prune":
            layers = [layer_from_values(name, kinds[name], retrained[name], raw=True) for name in names]
            finetune_epochs = 0
        else:
            layers = []
            for name in names:
                k = settings.conv_clusters if kinds[name] == "conv" else settings.fc_clusters
                kept = retrained[name][masks[name]]
                centres = kmeans_centres(kept, k=k - 1)
                shared = torch.zeros_like(retrained[name])
                if len(centres):
                    shared[masks[name]] = centres[(kept[:, None] - centres[None, :]).abs().argmin(1)]
                layers.append(layer_from_values(name, kinds[name], shared))
            finetune_epochs = settings.finetune_epochs
    _load_layers(network, layers)
    metrics.update({f"{split}_accuracy_quantised": accuracy(network, x, y) for split, (x, y) in splits.items()})
    if finetune_epochs:
        layers = finetune_codebooks(network, layers, data, epochs=finetune_epochs,
                                    learning_rate=settings.finetune_learning_rate,
                                    batch_size=spec.inference.batch_size, seed=spec.seed, progress=progress)
    network.eval()
    metrics["folded_weights"] = 0
    if settings.fold_dead_units:
        layers, metrics["folded_weights"] = fold_dead_units(network, layers)
    assignments = ({layer.name: torch.where(layer.indices == 0, 0, assignments[layer.name]) for layer in layers}
                   if method == "sws" else {layer.name: layer.indices for layer in layers})
    metrics.update({f"{split}_accuracy_after": accuracy(network, x, y) for split, (x, y) in splits.items()})
    weight_names = set(names)
    quantised_network = QuantisedNetwork(
        layers=layers,
        others={k: v.detach().cpu().to(torch.float32) for k, v in network.state_dict().items() if k not in weight_names},
        spec=spec.to_dict(),
        data_shape={"input_shape": list(data.input_shape), "task": data.task, "n_outputs": data.n_classes or 1},
    )
    metrics.update({
        "method": method,
        "model": spec.name,
        "seed": spec.seed,
        "prior_weight": spec.prior.weight if method == "sws" else None,
        "pretrain_epochs": spec.inference.pretrain_epochs,
        "epochs": len(history) + finetune_epochs,
        "finetune_epochs": finetune_epochs,
        "seconds": pretrain_seconds + time.perf_counter() - started,
    })
    return CompressionResult(method=method, quantised=quantised_network, network=network, pretrained=pretrained,
                             retrained=retrained, assignments=assignments, metrics=metrics, history=history,
                             mixture=mixture)


def sweep_prior_weight(
    spec: Spec,
    weights: Sequence[float],
    *,
    tolerance: float = 0.01,
    network_state: dict[str, torch.Tensor] | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[CompressionResult, list[dict[str, Any]]]:
    """Compress with soft weight-sharing at each τ and pick one on the validation split.

    The pick is :func:`choose_on_validation`'s. The network is pretrained once and shared by all runs.

    Returns
    -------
    best : CompressionResult
    table : list of dict
        Per τ: ``prior_weight``, ``valid_accuracy_after``, ``han_huffman_rate``, ``chosen``.
    """
    if not weights:
        raise BayesSWSError("the sweep needs at least one prior weight")
    torch_device = resolve_device(device)
    with use_backend(spec.inference.kernels):
        data = _load_data(spec, torch_device)
        if data.valid_x is None:
            raise BayesSWSError("a sweep picks τ on the validation split: set data.validation_fraction > 0")
        model, _ = pretrained_model(spec, data, network_state=network_state, progress=progress)
        state = {k: v.detach().clone() for k, v in model.network.state_dict().items()}
        results = []
        for weight in weights:
            swept = replace(spec, prior=replace(spec.prior, weight=float(weight)))
            model, _ = pretrained_model(swept, data, network_state=state, progress=progress)
            results.append(_compress_pretrained(swept, "sws", model, data, 0.0, progress=progress))
    table = [{"prior_weight": float(w), "valid_accuracy_before": r.metrics["valid_accuracy_before"],
              "valid_accuracy_after": r.metrics["valid_accuracy_after"],
              "han_huffman_rate": storage_report(r.quantised)["han_huffman_rate"]} for w, r in zip(weights, results)]
    best = choose_on_validation(table, tolerance=tolerance)
    for index, row in enumerate(table):
        row["chosen"] = index == best
    return results[best], table


def choose_on_validation(candidates: Sequence[dict[str, float]], *, tolerance: float) -> int:
    """Index of the candidate with the highest Han (Huffman) rate among those whose validation
    accuracy is within ``tolerance`` of the pretrained net's; failing that, the most accurate.

    Parameters
    ----------
    candidates : sequence of dict
        Each with ``valid_accuracy_before``, ``valid_accuracy_after`` and ``han_huffman_rate``.
    tolerance : float
        Accuracy loss allowed, as a fraction (0.01 is one point).
    """
    within = [i for i, c in enumerate(candidates)
              if c["valid_accuracy_before"] - c["valid_accuracy_after"] <= tolerance]
    if within:
        return max(within, key=lambda i: candidates[i]["han_huffman_rate"])
    return max(range(len(candidates)), key=lambda i: candidates[i]["valid_accuracy_after"])


# --------------------------------------------------------------------------- artefacts


def save_compression(result: CompressionResult, *, out_dir: str | os.PathLike[str],
                     extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model.sws``, ``compression.json`` and ``compression.png``; return the report.

    Every file is prepared first and then renamed into place, so a failure leaves
    none of them half-written.

    Parameters
    ----------
    result : CompressionResult
    out_dir : path-like
        Created if needed.
    extra : dict, optional
        More entries for ``compression.json`` (e.g. a sweep's table).

    Returns
    -------
    dict, the content of ``compression.json``: the result's metrics, the storage report
    (:func:`~bayes_sws.codec.storage_report`, with ``file_bytes`` and ``file_rate``),
    ``history`` and ``extra``.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BayesSWSError(f"output path {out} exists and is not a directory")
    encoded = encode_compressed(result.quantised)
    report = {**result.metrics, **storage_report(result.quantised, file_bytes=len(encoded)),
              "file": FILE_NAME, **(extra or {}), "history": result.history}
    order = list(result.pretrained)
    figure = plots.plot_compression(
        torch.cat([result.pretrained[n].reshape(-1).cpu() for n in order]),
        torch.cat([result.retrained[n].reshape(-1).cpu() for n in order]),
        torch.cat([result.assignments[n].reshape(-1).cpu() for n in order]),
        torch.cat([layer.weight.reshape(-1) for layer in result.quantised.layers]),
        title=f"{result.metrics['model']}: {result.method}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BayesSWSError(f"cannot create output directory {out}: {error.strerror}") from None
    staged = []
    try:
        for name, write in ((FILE_NAME, lambda p: Path(p).write_bytes(encoded)),
                            ("compression.json", lambda p: Path(p).write_text(json.dumps(report, indent=2))),
                            ("compression.png", lambda p: figure.savefig(p, dpi=110))):
            handle, temporary = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=Path(name).suffix)
            os.close(handle)
            staged.append((temporary, out / name))
            write(temporary)
            os.chmod(temporary, 0o644)
        for temporary, final in staged:
            os.replace(temporary, final)
    finally:
        for temporary, _ in staged:
            if os.path.exists(temporary):
                os.remove(temporary)
    return report
