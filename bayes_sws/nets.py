"""The network architectures that specifications name.

* ``mlp``: flatten, then Linear layers of the ``hidden`` sizes with an activation
  (LeNet-300-100 is ``hidden = [300, 100]``; Nowlan & Hinton's sunspots net is
  ``hidden = [8]`` with 12 inputs and one output).
* ``lenet5``: LeNet-5-Caffe (conv 20@5×5, max-pool, conv 50@5×5, max-pool,
  Linear 500, Linear to the outputs) for 1×28×28 images.
"""

from __future__ import annotations

import math

from torch import nn

from typing import TYPE_CHECKING

from .errors import SpecError

if TYPE_CHECKING:
    from .spec import NetworkSpec

__all__ = ["ACTIVATIONS", "ARCHITECTURES", "build_network"]

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
ARCHITECTURES = ("mlp", "lenet5")


def _mlp(spec: NetworkSpec, input_shape: tuple[int, ...], n_outputs: int) -> nn.Sequential:
    sizes = [math.prod(input_shape), *spec.hidden, n_outputs]
    layers: list[nn.Module] = [nn.Flatten()]
    for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if index < len(sizes) - 2:
            layers.append(ACTIVATIONS[spec.activation]())
    return nn.Sequential(*layers)


def _lenet5(spec: NetworkSpec, input_shape: tuple[int, ...], n_outputs: int) -> nn.Sequential:
    if len(input_shape) != 3 or input_shape[1:] != (28, 28):
        raise SpecError(f"network lenet5 needs 1x28x28 images, the data has shape {input_shape}")
    activation = ACTIVATIONS[spec.activation]
    return nn.Sequential(
        nn.Conv2d(input_shape[0], 20, 5), nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(800, 500), activation(), nn.Linear(500, n_outputs),
    )


def build_network(spec: NetworkSpec, *, input_shape: tuple[int, ...], n_outputs: int) -> nn.Module:
    """Build the network a specification names, freshly initialised (seed torch first).

    Parameters
    ----------
    spec : NetworkSpec
    input_shape : tuple of int
        Shape of one input, e.g. ``(1, 28, 28)`` or ``(12,)``.
    n_outputs : int
        Classes for classification, 1 for regression.

    Returns
    -------
    nn.Module mapping ``(B, *input_shape)`` to ``(B, n_outputs)``.
    """
    builders = {"mlp": _mlp, "lenet5": _lenet5}
    return builders[spec.architecture](spec, tuple(input_shape), n_outputs)
