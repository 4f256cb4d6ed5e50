"""The network architectures that specifications name.

* ``mlp``: flatten, then Linear layers of the ``hidden`` sizes with an activation
  (LeNet-300-100 is ``hidden = (300, 100)``; Nowlan & Hinton's sunspots net is
  ``hidden = (8,)`` with 12 inputs and one output).
* ``lenet5``: LeNet-5-Caffe (conv 20@5×5, max-pool, conv 50@5×5, max-pool,
  Linear 500, Linear to the outputs) for 1×28×28 images; ``hidden`` is not used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from .errors import BayesSWSError

__all__ = ["ACTIVATIONS", "ARCHITECTURES", "NetworkError", "build_network"]

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
ARCHITECTURES = ("mlp", "lenet5")


class NetworkError(BayesSWSError, ValueError):
    """The network cannot be built: an unknown name, or inputs of a shape it does not take."""


def _mlp(hidden: Sequence[int], activation: type[nn.Module], input_shape: tuple[int, ...],
         n_outputs: int) -> nn.Sequential:
    sizes = [math.prod(input_shape), *hidden, n_outputs]
    layers: list[nn.Module] = [nn.Flatten()]
    for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if index < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def _lenet5(activation: type[nn.Module], input_shape: tuple[int, ...], n_outputs: int) -> nn.Sequential:
    if len(input_shape) != 3 or input_shape[1:] != (28, 28):
        raise NetworkError(f"network lenet5 needs 1x28x28 images, the data has shape {input_shape}")
    return nn.Sequential(
        nn.Conv2d(input_shape[0], 20, 5), nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(800, 500), activation(), nn.Linear(500, n_outputs),
    )


def build_network(
    architecture: str,
    *,
    hidden: Sequence[int] = (64,),
    activation: str = "relu",
    input_shape: Sequence[int],
    n_outputs: int,
) -> nn.Module:
    """Build a network, freshly initialised (seed torch first for reproducible weights).

    Parameters
    ----------
    architecture : {"mlp", "lenet5"}
    hidden : sequence of int
        Hidden layer sizes of an ``mlp``.
    activation : {"relu", "tanh", "sigmoid"}
    input_shape : sequence of int
        Shape of one input, e.g. ``(1, 28, 28)`` or ``(12,)``.
    n_outputs : int
        Classes for classification, 1 for regression.

    Returns
    -------
    nn.Module mapping ``(B, *input_shape)`` to ``(B, n_outputs)``.

    Raises
    ------
    NetworkError
        For an unknown architecture or activation, non-positive sizes, or an
        input shape the architecture does not take.

    Examples
    --------
    >>> net = build_network("mlp", hidden=(300, 100), input_shape=(1, 28, 28), n_outputs=10)
    """
    if activation not in ACTIVATIONS:
        raise NetworkError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if any(size < 1 for size in (*hidden, n_outputs)):
        raise NetworkError(f"layer sizes must be positive, got hidden={list(hidden)}, n_outputs={n_outputs}")
    input_shape = tuple(input_shape)
    if architecture == "mlp":
        return _mlp(hidden, ACTIVATIONS[activation], input_shape, n_outputs)
    if architecture == "lenet5":
        return _lenet5(ACTIVATIONS[activation], input_shape, n_outputs)
    raise NetworkError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}")
