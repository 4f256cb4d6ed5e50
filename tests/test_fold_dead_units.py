"""fold_dead_units on networks where a naive pairing of consecutive weight layers is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bayes_sws.compression import compress, fold_dead_units, layer_from_values
from bayes_sws.spec import load_spec

DIGITS = Path(__file__).resolve().parents[1] / "models" / "digits.toml"


def _layers(network: nn.Module) -> list:
    return [layer_from_values(name, "conv" if parameter.dim() > 2 else "fc", parameter)
            for name, parameter in network.named_parameters() if name.endswith("weight")]


def _with_shared_values(network: nn.Module) -> nn.Module:
    """Every weight one of ±0.25, ±0.5 (no zeros), every bias in [-1, 1)."""
    values = torch.tensor([-0.5, -0.25, 0.25, 0.5])
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            parameter.copy_(values[torch.randint(4, parameter.shape)] if name.endswith("weight")
                            else 2 * torch.rand(parameter.shape) - 1)
    return network


def _assert_folding_keeps_the_outputs(network: nn.Module, x: torch.Tensor) -> int:
    expected = network(x).detach()
    nonzero = sum(int((p != 0).sum()) for n, p in network.named_parameters() if n.endswith("weight"))
    layers, removed = fold_dead_units(network, _layers(network))
    assert torch.allclose(network(x), expected, atol=1e-5)
    assert nonzero - removed == sum(layer.n_nonzero for layer in layers)
    return removed


def test_a_shared_activation_module_is_applied_to_the_folded_constant() -> None:
    torch.manual_seed(0)
    activation = nn.Sigmoid()
    network = _with_shared_values(nn.Sequential(nn.Linear(4, 3), activation, nn.Linear(3, 3), activation,
                                                nn.Linear(3, 2)))
    with torch.no_grad():
        network[2].weight[1] = 0              # unit 1 of layer 2: constant sigmoid(bias)
    assert _assert_folding_keeps_the_outputs(network, torch.randn(30, 4)) > 0



def test_an_in_place_activation_leaves_the_biases_of_the_live_units_as_they_are() -> None:
    torch.manual_seed(8)
    network = _with_shared_values(nn.Sequential(nn.Linear(4, 3), nn.ReLU(inplace=True), nn.Linear(3, 2)))
    with torch.no_grad():
        network[0].bias.copy_(torch.tensor([-0.5, 0.3, -0.8]))
        network[0].weight[1] = 0              # unit 1: constant relu(0.3); units 0 and 2 keep their negative biases
    assert _assert_folding_keeps_the_outputs(network, torch.randn(30, 4)) > 0
    assert network[0].bias.tolist() == pytest.approx([-0.5, 0.3, -0.8])

def test_a_weight_layer_applied_twice_is_left_alone() -> None:
    torch.manual_seed(1)
    twice = nn.Linear(3, 3)
    network = _with_shared_values(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), twice, nn.Tanh(), twice, nn.Tanh(),
                                                nn.Linear(3, 2)))
    with torch.no_grad():
        network[6].weight[:, 0] = 0           # the last layer never reads unit 0, the second `twice` does
        network[0].weight[2] = 0              # unit 2 of layer 0: constant, but `twice` also reads its own output
    _assert_folding_keeps_the_outputs(network, torch.randn(30, 4))



def test_layers_sharing_one_weight_tensor_are_left_alone() -> None:
    torch.manual_seed(6)
    network = _with_shared_values(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU(),
                                                nn.Linear(3, 3)))
    network[4].weight = network[2].weight     # tied: the last layer reads non-constant inputs with it
    with torch.no_grad():
        network[0].weight[1] = 0              # unit 1 of layer 0: constant relu(bias)
    _assert_folding_keeps_the_outputs(network, torch.randn(30, 4))


class _Residual(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self[1](self[0](x))
        return self[2](hidden) + hidden[:, :2]


def test_a_sequential_subclass_with_its_own_forward_is_left_alone() -> None:
    torch.manual_seed(7)
    network = _with_shared_values(_Residual(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
    with torch.no_grad():
        network[2].weight[:, 0] = 0           # the Linear layer never reads unit 0, the residual does
    assert _assert_folding_keeps_the_outputs(network, torch.randn(30, 4)) == 0

def test_max_pooling_across_a_linear_layers_features_is_not_folded_through() -> None:
    torch.manual_seed(2)
    network = _with_shared_values(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.MaxPool1d(3, stride=1, padding=1),
                                                nn.Linear(4, 2)))
    with torch.no_grad():
        network[3].weight[:, 1] = 0           # pooled feature 1 unread, but unit 1 feeds pooled features 0 and 2
    _assert_folding_keeps_the_outputs(network, torch.randn(30, 4))


def test_a_linear_layer_reading_a_convolutions_last_axis_is_not_paired_with_it() -> None:
    torch.manual_seed(3)
    network = _with_shared_values(nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Linear(8, 3)))
    with torch.no_grad():
        network[0].weight[1] = 0              # channel 1: constant, but the Linear layer reads positions
    _assert_folding_keeps_the_outputs(network, torch.randn(30, 1, 10))


@pytest.mark.parametrize("padding", [0, 1])
def test_transposed_convolutions_are_not_folded(padding: int) -> None:
    torch.manual_seed(4)
    network = _with_shared_values(nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.ConvTranspose2d(3, 3, 3,
                                                                                                   padding=padding)))
    with torch.no_grad():
        network[2].weight[:, 1] = 0           # output channel 1 reads nothing; input channel 1 is read
        network[0].weight[2] = 0              # channel 2 of conv 0: constant; transposed, it is not the same
    _assert_folding_keeps_the_outputs(network, torch.randn(10, 1, 8, 8))


def test_folding_through_strided_dilated_one_dimensional_convolutions_and_padded_pools() -> None:
    torch.manual_seed(5)
    network = _with_shared_values(nn.Sequential(
        nn.Conv1d(2, 4, 3), nn.Tanh(), nn.MaxPool1d(2, padding=1), nn.Conv1d(4, 3, 3, stride=2, dilation=2),
        nn.Sigmoid(), nn.Flatten(), nn.Linear(3 * 3, 2, bias=False)))
    with torch.no_grad():
        network[0].weight[1] = 0              # constant tanh(bias): folded into conv 3's bias
        network[3].weight[2] = 0              # constant sigmoid(bias): the Linear layer has no bias to take it
    removed = _assert_folding_keeps_the_outputs(network, torch.randn(10, 2, 21))
    assert removed == 2 * 3          # row 2 of conv 3 is zero already
    assert (network[3].weight[:, 1] == 0).all() and (network[6].weight[:, 6:] != 0).any()


@pytest.mark.parametrize("next_layer", ["linear without bias", "padded convolution"])
def test_a_unit_that_outputs_zero_is_folded_even_where_the_next_layer_cannot_take_a_constant(next_layer: str) -> None:
    torch.manual_seed(6)
    if next_layer == "linear without bias":
        network = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2, bias=False))
        x = torch.randn(30, 4)
    else:
        network = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 3, padding=1))
        x = torch.randn(10, 1, 8, 8)
    _with_shared_values(network)
    with torch.no_grad():
        network[0].bias.copy_(torch.tensor([-0.5, 0.3, -0.8]))
        network[0].weight[0] = 0              # constant relu(-0.5) = 0: nothing to carry, folded
        network[0].weight[1] = 0              # constant relu(0.3) > 0: it has to stay
    removed = _assert_folding_keeps_the_outputs(network, x)
    assert removed == network[2].weight[:, 0].numel()
    assert (network[2].weight[:, 0] == 0).all() and (network[2].weight[:, 1] != 0).all()


def test_after_folding_a_pruned_networks_assignments_are_its_layers_codebook_indices() -> None:
    spec = load_spec(DIGITS, overrides=["inference.pretrain_epochs=2", "inference.epochs=1",
                                        "compression.finetune_epochs=0", "compression.prune_fraction=0.6"])
    result = compress(spec, method="prune", progress=False)
    assert result.metrics["folded_weights"] > 0
    for layer in result.quantised.layers:
        assert torch.equal(result.assignments[layer.name], layer.indices)
