"""The compressed file (round trip, refusal of damaged files) and Han et al.'s storage accounting."""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from bayes_sws.codec import (
    MAGIC,
    QuantisedLayer,
    QuantisedNetwork,
    encode_compressed,
    huffman_code_lengths,
    layer_storage,
    read_compressed,
    sparse_entries,
    storage_report,
    write_compressed,
)
from bayes_sws.codec import _huffman_decode, _huffman_encode
from bayes_sws.compression import layer_from_values
from bayes_sws.errors import BayesSWSError

SPEC = {"name": "tiny", "network": {"architecture": "mlp", "hidden": [16], "activation": "relu"}}
SHAPE = {"input_shape": [12], "task": "classification", "n_outputs": 3}


def _quantised(*, first: torch.Tensor | None = None, raw_second: bool = False) -> QuantisedNetwork:
    generator = torch.Generator().manual_seed(0)
    if first is None:
        first = torch.randint(0, 4, (16, 12), generator=generator)
        first[torch.rand(16, 12, generator=generator) < 0.7] = 0
    second_values = torch.randn(3, 16, generator=generator) * (torch.rand(3, 16, generator=generator) < 0.5)
    second_values.view(-1)[2:40] = 0  # a run of zeros longer than a 5-bit gap: filler entries
    second = layer_from_values("3.weight", "fc", second_values if raw_second else torch.round(second_values * 4) / 4,
                               raw=raw_second)
    return QuantisedNetwork(
        layers=[QuantisedLayer("1.weight", "fc", first, torch.tensor([0.0, -0.31, 0.07, 0.52])), second],
        others={"1.bias": torch.randn(16, generator=generator), "3.bias": torch.randn(3, generator=generator)},
        spec=SPEC, data_shape=SHAPE)


@pytest.mark.parametrize("raw", [False, True], ids=["codebook", "raw-values"])
def test_loaded_file_predicts_exactly_like_the_in_memory_network_and_its_size_is_the_reported_bytes(
        tmp_path: Path, raw: bool) -> None:
    quantised = _quantised(raw_second=raw)
    path = tmp_path / "model.sws"
    size = write_compressed(quantised, path)
    assert size == path.stat().st_size == len(encode_compressed(quantised))
    assert storage_report(quantised, file_bytes=size)["file_bytes"] == path.stat().st_size
    loaded = read_compressed(path)
    for original, back in zip(quantised.layers, loaded.layers):
        assert torch.equal(original.weight, back.weight)
    x = torch.randn(50, 12)
    assert torch.equal(quantised.to_network()(x), loaded.to_network()(x))


@pytest.mark.parametrize("fill", ["all-zero", "no-zero"])
def test_an_all_zero_layer_and_a_layer_without_zeros_round_trip(tmp_path: Path, fill: str) -> None:
    first = torch.zeros(16, 12, dtype=torch.int64) if fill == "all-zero" else torch.randint(1, 4, (16, 12))
    quantised = _quantised(first=first)
    write_compressed(quantised, tmp_path / "m.sws")
    back = read_compressed(tmp_path / "m.sws").layers[0]
    assert torch.equal(back.weight, quantised.layers[0].weight)
    counts = layer_storage(quantised.layers[0])
    assert counts["nonzero"] == (0 if fill == "all-zero" else 16 * 12)
    assert counts["fillers"] == 0 and counts["entries"] == counts["nonzero"]  # trailing zeros need no entries


def test_han_accounting_of_a_hand_built_layer_equals_the_hand_count() -> None:
    # 80 weights, non-zero at 0 (index 1), 1 (index 2) and 66 (index 1): the 64 zeros between the
    # last two exceed a 5-bit gap (31), so two fillers skip 31 zeros each and the entry at 66 skips none.
    indices = torch.zeros(2, 40, dtype=torch.int64)
    indices.view(-1)[[0, 1, 66]] = torch.tensor([1, 2, 1])
    layer = QuantisedLayer("w", "fc", indices, torch.tensor([0.0, -0.5, 0.25]))
    skips, symbols, positions = sparse_entries(indices.view(-1).numpy(), index_bits=5)
    assert skips.tolist() == [0, 0, 31, 31, 0]
    assert symbols.tolist() == [1, 2, 0, 0, 1]
    assert positions.tolist() == [0, 1, 33, 65, 66]
    counts = layer_storage(layer)
    # Huffman: skips (0:3, 31:2) take 1 bit each, 5 bits; values (1:2, 0:2, 2:1) 2·1 + 2·2 + 1·2 = 8 bits.
    assert counts == {"weights": 80, "nonzero": 3, "entries": 5, "fillers": 2, "codebook_size": 3,
                      "codebook_bits": 96, "index_bits_fixed": 25, "index_bits_huffman": 5,
                      "value_bits_fixed": 10, "value_bits_huffman": 8}
    report = storage_report(QuantisedNetwork([layer], {}, SPEC, SHAPE))
    assert report["han_huffman_bits"] == 96 + 5 + 8 and report["han_fixed_bits"] == 96 + 25 + 10
    assert math.isclose(report["han_huffman_rate"], 32 * 80 / 109)
    assert math.isclose(report["parameter_rate"], 80 / 3)
    assert report["distinct_values"] == 3


def test_conv_layers_use_8_bit_gaps_and_raw_layers_32_bit_values() -> None:
    indices = torch.zeros(600, dtype=torch.int64)
    indices[[3, 303, 559]] = torch.tensor([1, 2, 1])  # 299 zeros: one 8-bit filler (skip 255), then 43; 255: none
    conv = layer_storage(QuantisedLayer("c", "conv", indices.reshape(6, 1, 10, 10), torch.tensor([0.0, 1.0, 2.0])))
    assert (conv["entries"], conv["fillers"], conv["index_bits_fixed"]) == (4, 1, 32)
    raw = layer_storage(QuantisedLayer("r", "fc", indices, torch.tensor([0.0, 1.0, 2.0]), raw=True))
    assert raw["value_bits_fixed"] == raw["value_bits_huffman"] == 32 * raw["entries"] and raw["codebook_bits"] == 0


def test_huffman_codes_decode_back_and_stay_within_one_bit_of_the_entropy() -> None:
    rng = np.random.default_rng(1)
    symbols = rng.choice(9, size=5000, p=[0.5, 0.2, 0.1, 0.08, 0.05, 0.04, 0.02, 0.01, 0.0])
    counts = np.bincount(symbols, minlength=9)
    lengths = huffman_code_lengths(counts)
    assert lengths[8] == 0 and sum(2.0 ** -l for l in lengths if l) <= 1
    p = counts[counts > 0] / counts.sum()
    entropy = -(p * np.log2(p)).sum()
    average = (counts * lengths).sum() / counts.sum()
    assert entropy <= average < entropy + 1
    assert np.array_equal(_huffman_decode(_huffman_encode(symbols, lengths), lengths, len(symbols)), symbols)


def _refusal(path: Path) -> str:
    with pytest.raises(BayesSWSError) as error:
        read_compressed(path)
    message = str(error.value)
    assert "\n" not in message
    return message.replace(str(path), "FILE")


def test_corrupt_truncated_and_foreign_files_are_refused_in_one_line(tmp_path: Path) -> None:
    data = encode_compressed(_quantised())
    cases = {
        "flipped": data[:-5] + bytes([data[-5] ^ 0x40]) + data[-4:],
        "truncated": data[:-7],
        "header-only": data[:10],
        "foreign": b"PK\x03\x04" + data[4:],
        "version": data[:4] + struct.pack("<H", 99) + data[6:],
    }
    expected = {"flipped": "checksum", "truncated": "truncated", "header-only": "truncated",
                "foreign": "not a bayes-sws compressed file", "version": "format version 99"}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        assert expected[name] in _refusal(tmp_path / name), name
    assert "not found" in _refusal(tmp_path / "missing.sws")


def test_declared_sizes_bound_the_decoding_even_with_a_valid_checksum(tmp_path: Path) -> None:
    data = encode_compressed(_quantised())
    header = struct.Struct("<4sHHQIIQ")
    magic, version, reserved, _, metadata_size, _, declared = header.unpack_from(data)
    payload = data[header.size:]
    metadata = json.loads(zlib.decompress(payload[:metadata_size]))
    metadata["layers"][0]["entries"] = 10**9  # more entries than the layer has weights
    forged = zlib.compress(json.dumps(metadata).encode())
    body = forged + payload[metadata_size:]
    (tmp_path / "forged.sws").write_bytes(
        header.pack(MAGIC, version, reserved, len(body), len(forged), zlib.crc32(body), declared) + body)
    assert "declared sizes out of range" in _refusal(tmp_path / "forged.sws")
