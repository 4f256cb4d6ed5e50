"""Compression: merging and quantising, the baselines' pieces, the codebook fine-tune, and the CLI end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bayes_sws.cli import main
from bayes_sws.codec import load_compressed, read_compressed
from bayes_sws.compression import (
    KeepPruned,
    accuracy,
    choose_on_validation,
    finetune_codebooks,
    fold_dead_units,
    kmeans_centres,
    layer_from_values,
    load_compressed_data,
    magnitude_masks,
    merge_components,
    quantise_to_components,
)
from bayes_sws.data import load_dataset
from bayes_sws.experiment import build_model
from bayes_sws.inference import fit_map
from bayes_sws.spec import load_spec
from bayes_sws.prior import GaussianMixture

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "models" / "digits.toml")
SHORT = ["--set", "inference.pretrain_epochs=2", "--set", "inference.epochs=2", "--set", "data.validation_fraction=0.2",
         "--set", "compression.finetune_epochs=1", "--set", "compression.prune_fraction=0.6"]
CENTRES = torch.tensor([0.0, -0.4, 0.3])


def _mixture(means: list[float], scales: list[float], proportions: list[float]) -> GaussianMixture:
    return GaussianMixture(torch.tensor(proportions).log(), torch.tensor(means), torch.tensor(scales))


def _draws() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    component = torch.multinomial(torch.tensor([0.6, 0.2, 0.2]), 3000, replacement=True, generator=generator)
    return CENTRES[component] + 0.01 * torch.randn(3000, generator=generator)


def test_merging_joins_near_duplicate_components_and_quantising_recovers_the_centres() -> None:
    # The mixture the weights were drawn from, with each non-zero centre split into two close copies.
    split = _mixture([0.0, -0.4, -0.401, 0.3, 0.3015], [0.01] * 5, [0.6, 0.1, 0.1, 0.1, 0.1])
    merged = merge_components(split, threshold=0.1)
    assert merged.means.numel() == 3
    assert torch.allclose(torch.sort(merged.means).values, torch.sort(CENTRES).values, atol=2e-3)
    assert math.isclose(float(merged.proportions.sum()), 1.0, rel_tol=1e-6)
    components, values = quantise_to_components(_draws(), merged)
    assert set(torch.unique(values).tolist()) <= set(merged.means.tolist()) | {0.0}
    assert float(values[components == 0].abs().max()) == 0.0
    # every draw lands on the centre it came from
    assert torch.allclose(values, CENTRES[(_draws()[:, None] - CENTRES).abs().argmin(1)], atol=2e-3)


def test_distinct_components_are_not_merged_and_the_zero_component_keeps_mean_zero() -> None:
    distinct = _mixture([0.0, -0.4, 0.3], [0.01] * 3, [0.6, 0.2, 0.2])
    assert torch.equal(merge_components(distinct, threshold=0.1).means, distinct.means)
    components, values = quantise_to_components(torch.tensor([0.001, 0.3]), _mixture([0.001, 0.3], [0.01] * 2, [0.5] * 2))
    assert values.tolist()[0] == 0.0  # the zero component's weights become exact zeros
    near_zero = _mixture([0.0, 0.0005, 0.3], [0.01] * 3, [0.6, 0.2, 0.2])
    merged = merge_components(near_zero, threshold=0.1)
    assert merged.means.tolist()[0] == 0.0 and merged.means.numel() == 2


def test_kmeans_recovers_the_centres_of_clustered_weights() -> None:
    weights = _draws()
    centres = kmeans_centres(weights[weights.abs() > 0.1], k=2)
    assert torch.allclose(centres, torch.tensor([-0.4, 0.3]), atol=2e-3)


@pytest.mark.parametrize("fill", ["all-zero", "no-zero", "mixed"])
def test_a_layer_built_from_values_holds_exactly_those_values(fill: str) -> None:
    values = {"all-zero": torch.zeros(5, 7), "no-zero": torch.full((5, 7), 0.25),
              "mixed": torch.tensor([0.0, -0.4, 0.3, 0.0, 0.3]).repeat(7).reshape(5, 7)}[fill]
    for raw in (False, True):
        layer = layer_from_values("w", "fc", values, raw=raw)
        assert torch.equal(layer.weight, values) and float(layer.codebook[0]) == 0.0
        assert layer.n_nonzero == int((values != 0).sum())


def test_the_validation_choice_takes_the_highest_rate_within_tolerance_else_the_most_accurate() -> None:
    def row(after: float, rate: float) -> dict:
        return {"valid_accuracy_before": 0.90, "valid_accuracy_after": after, "han_huffman_rate": rate}

    assert choose_on_validation([row(0.895, 50), row(0.80, 500), row(0.891, 90), row(0.91, 20)], tolerance=0.01) == 2
    assert choose_on_validation([row(0.70, 50), row(0.85, 10), row(0.60, 500)], tolerance=0.01) == 1


def test_magnitude_masks_prune_the_smallest_fraction_of_each_layer() -> None:
    weights = {"a": torch.arange(1.0, 101.0), "b": -torch.arange(1.0, 11.0)}
    masks = magnitude_masks(weights, fraction=0.9)
    assert masks["a"].sum() == 10 and bool(masks["a"][-10:].all())
    assert masks["b"].tolist() == [False] * 9 + [True]


def test_keep_pruned_holds_the_pruned_weights_at_zero_while_the_others_train() -> None:
    data = load_dataset("digits", seed=0)
    model = build_model(load_spec(DIGITS, overrides=["prior.weight=0"]), input_shape=data.input_shape,
                        task=data.task, n_outputs=10)
    start = {name: p.detach().clone() for name, p in model.network.named_parameters() if name in model.prior_sites}
    masks = magnitude_masks(start, fraction=0.5)
    state = fit_map(model, data, epochs=1, batch_size=256, callbacks=[KeepPruned(masks)], progress=False,
                    init_values={name: value * masks[name] for name, value in start.items()})
    for name, mask in masks.items():
        assert float(state.values[name][~mask].abs().max()) == 0.0
        assert not torch.equal(state.values[name][mask], start[name][mask])


def test_codebook_fine_tune_keeps_assignments_and_zeros_and_moves_the_shared_values() -> None:
    data = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.Adam(network.parameters(), lr=0.05)
    for _ in range(100):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(network(data.train_x), data.train_y).backward()
        optimizer.step()
    weight = network[1].weight.detach()
    # a trained net's signs with too small a shared magnitude: the fine-tune has to grow it
    quantised = torch.where(weight.abs() < 0.05, torch.zeros_like(weight), torch.sign(weight) * 0.01)
    layer = layer_from_values("1.weight", "fc", quantised)

    def training_loss() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(network(data.train_x), data.train_y))

    network[1].weight.data.copy_(quantised)
    before = training_loss()
    [tuned] = finetune_codebooks(network, [layer], data, epochs=1, learning_rate=1e-2, batch_size=128, seed=0,
                                 progress=False)
    assert torch.equal(tuned.indices, layer.indices)
    assert torch.equal(tuned.weight == 0, quantised == 0)
    assert torch.unique(tuned.weight).numel() == 3 and not torch.equal(tuned.codebook, layer.codebook)
    assert torch.equal(network[1].weight.detach(), tuned.weight)
    assert training_loss() < before - 0.1


def _quantised_layers(network: torch.nn.Module) -> list:
    return [layer_from_values(name, "conv" if parameter.dim() == 4 else "fc", parameter)
            for name, parameter in network.named_parameters() if name.endswith("weight")]


def _shared_values(network: torch.nn.Module) -> torch.nn.Module:
    """Every weight one of ±0.25, ±0.5 (no zeros), as after quantising."""
    values = torch.tensor([-0.5, -0.25, 0.25, 0.5])
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if name.endswith("weight"):
                parameter.copy_(values[torch.randint(4, parameter.shape)])
    return network


def test_folding_removes_the_weights_of_switched_off_and_unread_units_and_keeps_the_outputs() -> None:
    torch.manual_seed(0)
    network = _shared_values(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 5), torch.nn.ReLU(),
                                           torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)))
    with torch.no_grad():
        network[1].weight[0] = 0              # hidden unit 0 of layer 1: constant relu(bias)
        network[1].bias[0] = 0.7
        network[3].weight[:, 1] = 0           # hidden unit 1 of layer 1: never read
        network[5].weight[:, 2] = 0           # hidden unit 2 of layer 3: never read
    x = torch.randn(50, 6)
    expected = network(x).detach()
    nonzero = [int((network[i].weight != 0).sum()) for i in (1, 3, 5)]
    zeroed = torch.zeros(4, 5, dtype=torch.bool)
    zeroed[:, 0] = zeroed[2] = True           # folded into layer 3's bias; unread
    expected_removed = int((network[3].weight[zeroed] != 0).sum()) + int((network[1].weight[1] != 0).sum())
    layers, removed = fold_dead_units(network, _quantised_layers(network))
    assert removed == expected_removed > 0
    assert sum(layer.n_nonzero for layer in layers) == sum(nonzero) - removed
    assert (network[3].weight[:, 0] == 0).all() and (network[1].weight[1] == 0).all()
    assert (network[3].weight[2] == 0).all()
    assert torch.allclose(network(x), expected, atol=1e-6)
    assert fold_dead_units(network, layers)[1] == 0


@pytest.mark.parametrize("padding", [0, 2])
def test_folding_a_dead_channel_goes_through_pooling_and_flattening_and_skips_padded_convolutions(
        padding: int) -> None:
    torch.manual_seed(1)
    network = _shared_values(torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3), torch.nn.MaxPool2d(2), torch.nn.Conv2d(3, 4, 3, padding=padding),
        torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(4 * (2 + padding) ** 2, 5)))
    with torch.no_grad():
        network[0].weight[1] = 0              # channel 1 of conv 0: constant bias after pooling
        network[2].weight[2] = 0              # channel 2 of conv 2: constant bias, read by the Linear layer
    x = torch.randn(20, 1, 14, 14)
    expected = network(x).detach()
    fed_by_channel_1 = int((network[2].weight[:, 1] != 0).sum())
    positions = network[5].weight.shape[1] // 4
    fed_by_channel_2 = int((network[5].weight[:, 2 * positions:3 * positions] != 0).sum())
    layers, removed = fold_dead_units(network, _quantised_layers(network))
    assert removed == fed_by_channel_2 + (fed_by_channel_1 if padding == 0 else 0)
    assert (network[5].weight[:, 2 * positions:3 * positions] == 0).all()
    assert ((network[2].weight[:, 1] == 0).all()) == (padding == 0)
    assert torch.allclose(network(x), expected, atol=1e-5)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compressed") / "sws"
    assert main(["compress", DIGITS, "--out", str(out), "--quiet", *SHORT]) == 0
    return out


def test_compress_writes_the_file_its_report_and_the_figure(compressed: Path) -> None:
    report = json.loads((compressed / "compression.json").read_text())
    assert report["file_bytes"] == (compressed / "model.sws").stat().st_size
    assert (compressed / "compression.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for key in ("valid_accuracy_before", "test_accuracy_after", "weights", "nonzero_fraction", "distinct_values",
                "han_huffman_rate", "han_fixed_rate", "file_rate", "parameter_rate", "layers", "folded_weights"):
        assert key in report
    assert report["weights"] == 64 * 64 + 64 * 10
    assert {"zero_precision", "zero_fraction", "valid_quantised_accuracy"} <= set(report["history"][-1])
    assert report["epochs"] == 2 + 1


def test_evaluate_reports_the_compressed_networks_accuracy(compressed: Path, capsys) -> None:
    assert main(["evaluate", str(compressed / "model.sws")]) == 0
    report = json.loads((compressed / "compression.json").read_text())
    assert f"test_accuracy={report['test_accuracy_after']:.4f}" in capsys.readouterr().out
    data = load_compressed_data(read_compressed(compressed / "model.sws"))
    assert accuracy(load_compressed(compressed / "model.sws"), data.test_x, data.test_y) == report["test_accuracy_after"]


@pytest.mark.parametrize("method,fold", [("dc", True), ("prune", True), ("dc", False)])
def test_baselines_compress_through_the_same_path(tmp_path: Path, method: str, fold: bool) -> None:
    out = tmp_path / method
    assert main(["compress", DIGITS, "--method", method, "--out", str(out), "--quiet", *SHORT,
                 "--set", f"compression.fold_dead_units={str(fold).lower()}"]) == 0
    report = json.loads((out / "compression.json").read_text())
    assert report["method"] == method and report["epochs"] == 2 + 1
    assert report["nonzero"] + report["folded_weights"] == pytest.approx(0.4 * report["weights"], abs=10)
    assert (report["folded_weights"] > 0) == fold
    if method == "dc":
        assert all(layer["distinct_values"] <= 32 for layer in report["layers"].values())


def test_the_sweep_compresses_at_each_prior_weight_from_one_pretrained_net_and_keeps_the_chosen_one(
        tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    assert main(["compress", DIGITS, "--sweep", "3,0.01", "--out", str(out), "--quiet", *SHORT]) == 0
    report = json.loads((out / "compression.json").read_text())
    table = report["sweep"]
    assert [row["prior_weight"] for row in table] == [3.0, 0.01]
    assert table[0]["valid_accuracy_before"] == table[1]["valid_accuracy_before"] == report["valid_accuracy_before"]
    assert table[0]["han_huffman_rate"] != table[1]["han_huffman_rate"]
    chosen = [row for row in table if row["chosen"]]
    assert len(chosen) == 1 and table.index(chosen[0]) == choose_on_validation(table, tolerance=0.01)
    assert report["prior_weight"] == chosen[0]["prior_weight"]
    assert report["valid_accuracy_after"] == chosen[0]["valid_accuracy_after"]
    assert report["han_huffman_rate"] == chosen[0]["han_huffman_rate"]


def test_bad_input_exits_2_with_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "bad.sws").write_bytes(b"BSWS\x01")
    assert main(["evaluate", str(tmp_path / "bad.sws")]) == 2
    assert main(["compress", DIGITS, "--sweep", "0.1,x", "--out", str(tmp_path / "o")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "truncated" in errors[0] and "--sweep" in errors[1]
    assert not (tmp_path / "o").exists()
