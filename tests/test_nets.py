"""The architectures build from plain arguments and map (B, *input_shape) to (B, n_outputs)."""

import pytest
import torch

from bayes_sws.errors import BayesSWSError
from bayes_sws.nets import ARCHITECTURES, build_network


@pytest.mark.parametrize(
    ("kwargs", "input_shape", "n_outputs"),
    [
        (dict(hidden=(300, 100)), (1, 28, 28), 10),
        (dict(hidden=(8,), activation="tanh"), (12,), 1),
        (dict(hidden=(), activation="sigmoid"), (8, 8), 3),
    ],
)
def test_mlp_maps_inputs_to_outputs(kwargs, input_shape, n_outputs):
    net = build_network("mlp", **kwargs, input_shape=input_shape, n_outputs=n_outputs)
    linear = [m for m in net if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linear] == [*kwargs["hidden"], n_outputs]
    assert net(torch.zeros(5, *input_shape)).shape == (5, n_outputs)


def test_lenet5_maps_28x28_images_to_outputs_through_431k_weights():
    net = build_network("lenet5", input_shape=(1, 28, 28), n_outputs=10)
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert sum(p.numel() for name, p in net.named_parameters() if name.endswith("weight")) == 430_500


def test_every_architecture_builds():
    for architecture in ARCHITECTURES:
        build_network(architecture, input_shape=(1, 28, 28), n_outputs=2)


@pytest.mark.parametrize("input_shape", [(1, 8, 8), (784,), (3, 28, 28, 1)])
def test_lenet5_on_other_inputs_raises_a_user_error_naming_the_shape(input_shape):
    with pytest.raises(BayesSWSError, match=r"lenet5 needs 1x28x28 images.*" + r"\(" + str(input_shape[0])):
        build_network("lenet5", input_shape=input_shape, n_outputs=10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(architecture="resnet"), "architecture"),
        (dict(architecture="mlp", activation="gelu"), "activation"),
        (dict(architecture="mlp", hidden=(0,)), "positive"),
    ],
)
def test_invalid_arguments_raise_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_network(**kwargs, input_shape=(4,), n_outputs=2)
