"""The compressed network file and its storage accounting.

A quantised network (:class:`QuantisedNetwork`: per layer an index into a small
codebook for every weight, index 0 meaning exact zero) is stored as Han et al.
(2016) describe it: each layer's weights in flattened (row-major) order as sparse
entries, each entry the number of zeros skipped since the previous one (a relative
index of ``index_bits`` bits: 5 for fully connected layers, 8 for convolutions; a
longer run of zeros takes *filler* entries of value zero) and a codebook index;
both streams are canonical-Huffman coded. Pruned-only layers store each entry's
value as float32 instead of a codebook index.

File layout (little-endian)::

    header   magic "BSWS", format version (u16), reserved (u16), payload bytes (u64),
             metadata bytes (u32), CRC32 of the payload (u32), declared weights (u64)
    payload  zlib(JSON metadata: spec, data shape, per layer shape / entries /
             Huffman code lengths / stream sizes, other parameters' shapes)
             then per layer: codebook (float32), index stream, value stream,
             then every other parameter and buffer as float32.

:func:`read_compressed` checks magic, version, sizes and checksum before decoding,
and decodes no more than the header and metadata declare.

Three rates, each named for what it counts:

* ``file_rate``: 32 bits × every parameter of the network / the file's bits;
* ``han_huffman_rate`` and ``han_fixed_rate``: Han et al.'s accounting of the prior
  layers' weights only (32 bits × |W| against index bits + value bits + a 32-bit
  codebook entry per centre), with Huffman codes or fixed-width codes
  (``index_bits`` per index, ⌈log2 K⌉ per value; 32 for float values);
* ``parameter_rate``: |W| / non-zero weights, the ratio Sparse VD and DNS report.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import BayesSWSError, one_line
from .nets import build_network

__all__ = [
    "CONV_INDEX_BITS",
    "FC_INDEX_BITS",
    "FORMAT_VERSION",
    "MAGIC",
    "QuantisedLayer",
    "QuantisedNetwork",
    "encode_compressed",
    "huffman_code_lengths",
    "layer_storage",
    "load_compressed",
    "read_compressed",
    "sparse_entries",
    "storage_report",
    "write_compressed",
]

MAGIC = b"BSWS"
FORMAT_VERSION = 1
FC_INDEX_BITS = 5
CONV_INDEX_BITS = 8
_HEADER = struct.Struct("<4sHHQIIQ")
_MAX_CODE_LENGTH = 24
_MAX_METADATA = 1 << 24


@dataclass
class QuantisedLayer:
    """One layer's weights as codebook indices.

    Attributes
    ----------
    name : str
        The parameter's name in the network, e.g. ``"1.weight"``.
    kind : {"fc", "conv"}
    indices : Tensor of int64, the weight's shape
        Each weight's codebook index; 0 is exact zero.
    codebook : Tensor of float32, ``(K,)``
        ``codebook[0] == 0``. For a ``raw`` layer, entry i ≥ 1 is the i-th non-zero
        weight's own value.
    raw : bool
        Values stored as float32 per entry rather than as codebook indices (pruning alone).
    """

    name: str
    kind: str
    indices: torch.Tensor
    codebook: torch.Tensor
    raw: bool = False

    @property
    def weight(self) -> torch.Tensor:
        """The quantised weights, float32 of the layer's shape."""
        return self.codebook.to(self.indices.device)[self.indices]

    @property
    def index_bits(self) -> int:
        return CONV_INDEX_BITS if self.kind == "conv" else FC_INDEX_BITS

    @property
    def n_nonzero(self) -> int:
        return int((self.weight != 0).sum())


@dataclass
class QuantisedNetwork:
    """A network with quantised prior layers: what the compressed file holds.

    Attributes
    ----------
    layers : list of QuantisedLayer
    others : dict of str to Tensor
        Every other entry of the network's ``state_dict`` (biases, …), float32.
    spec : dict
        The specification (``Spec.to_dict()``) that names the architecture and the data.
    data_shape : dict
        ``input_shape``, ``task`` and ``n_outputs``.
    """

    layers: list[QuantisedLayer]
    others: dict[str, torch.Tensor]
    spec: dict[str, Any]
    data_shape: dict[str, Any] = field(default_factory=dict)

    def to_network(self, *, device: str | torch.device = "cpu") -> torch.nn.Module:
        """A fresh torch module holding the quantised weights (in eval mode)."""
        network_spec = self.spec.get("network", {})
        network = build_network(network_spec.get("architecture", "mlp"), hidden=network_spec.get("hidden", (64,)),
                                activation=network_spec.get("activation", "relu"),
                                input_shape=self.data_shape["input_shape"], n_outputs=self.data_shape["n_outputs"])
        state = {**self.others, **{layer.name: layer.weight for layer in self.layers}}
        try:
            network.load_state_dict({k: v.cpu() for k, v in state.items()})
        except RuntimeError as error:
            raise BayesSWSError(f"the quantised layers do not fit the network of the specification: "
                                f"{one_line(error)}") from None
        return network.to(device).eval()


# --------------------------------------------------------------------------- Huffman


def huffman_code_lengths(counts: np.ndarray) -> np.ndarray:
    """Code length of each symbol of a Huffman code for these counts.

    Parameters
    ----------
    counts : array of int, ``(S,)``
        Occurrences of each symbol of the alphabet.

    Returns
    -------
    array of int, ``(S,)``: 0 for unused symbols; 1 where only one symbol occurs;
    lengths at most 24 (rare counts are flattened until they fit).
    """
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(len(counts), dtype=np.int64)
    used = np.flatnonzero(counts)
    if len(used) == 1:
        lengths[used] = 1
    if len(used) <= 1:
        return lengths
    weights = counts[used]
    while True:
        heap = [(int(w), index, [index]) for index, w in enumerate(weights)]
        heapq.heapify(heap)
        depth = np.zeros(len(used), dtype=np.int64)
        tie = len(heap)
        while len(heap) > 1:
            w1, _, members1 = heapq.heappop(heap)
            w2, _, members2 = heapq.heappop(heap)
            depth[members1 + members2] += 1
            heapq.heappush(heap, (w1 + w2, tie, members1 + members2))
            tie += 1
        if depth.max() <= _MAX_CODE_LENGTH:
            lengths[used] = depth
            return lengths
        weights = (weights + 1) // 2


def _canonical_codes(lengths: np.ndarray) -> np.ndarray:
    codes = np.zeros(len(lengths), dtype=np.int64)
    code, previous = 0, 0
    for symbol in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[symbol]) - previous
        codes[symbol], previous = code, int(lengths[symbol])
        code += 1
    return codes


def _huffman_encode(symbols: np.ndarray, lengths: np.ndarray) -> bytes:
    if len(symbols) == 0:
        return b""
    codes = _canonical_codes(lengths)
    size, value = lengths[symbols], codes[symbols]
    owner = np.repeat(np.arange(len(symbols)), size)
    within = np.arange(int(size.sum())) - np.repeat(np.cumsum(size) - size, size)
    bits = (value[owner] >> (size[owner] - 1 - within)) & 1
    return np.packbits(bits.astype(np.uint8)).tobytes()


def _huffman_decode(data: bytes, lengths: np.ndarray, count: int) -> np.ndarray:
    """Decode ``count`` symbols; raises ``ValueError`` on a stream that does not hold them."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    if lengths.min() < 0 or lengths.max() > _MAX_CODE_LENGTH or not lengths.any():
        raise ValueError("invalid Huffman code lengths")
    if sum(2.0 ** -int(l) for l in lengths if l) > 1.0:
        raise ValueError("Huffman code lengths violate the Kraft inequality")
    ordered = sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s))
    codes = _canonical_codes(lengths)
    table = {(int(lengths[s]), int(codes[s])): int(s) for s in ordered}
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8)).tolist()
    out = np.empty(count, dtype=np.int64)
    code = length = produced = 0
    for bit in bits:
        code, length = (code << 1) | bit, length + 1
        symbol = table.get((length, code))
        if symbol is not None:
            out[produced] = symbol
            produced += 1
            if produced == count:
                return out
            code = length = 0
        elif length > _MAX_CODE_LENGTH:
            raise ValueError("invalid Huffman code in the stream")
    raise ValueError(f"the stream ends after {produced} of {count} symbols")


# --------------------------------------------------------------------------- sparse entries


def sparse_entries(indices: np.ndarray, *, index_bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Han et al.'s sparse entries of one layer's flattened codebook indices.

    Each entry stores the zeros skipped since the previous entry (at most
    2**index_bits − 1); a longer run of zeros takes filler entries (index 0) that each
    skip 2**index_bits − 1 zeros and stand on one zero themselves.

    Parameters
    ----------
    indices : array of int, ``(N,)``
        Codebook indices in storage order; 0 is zero.
    index_bits : int

    Returns
    -------
    skips, symbols, positions : arrays of int, ``(E,)``
        Zeros skipped before each entry, its codebook index (0 for a filler), and its
        position in ``indices``.
    """
    span = 1 << index_bits
    nonzero = np.flatnonzero(indices)
    gaps = np.diff(np.concatenate([[-1], nonzero])) - 1
    fillers = gaps // span
    skips = np.concatenate([np.concatenate([np.full(f, span - 1), [g - f * span]]) for f, g in zip(fillers, gaps)]
                           ) if len(nonzero) else np.zeros(0, dtype=np.int64)
    positions = np.cumsum(skips + 1) - 1
    return skips.astype(np.int64), np.asarray(indices)[positions].astype(np.int64), positions.astype(np.int64)


def layer_storage(layer: QuantisedLayer) -> dict[str, int]:
    """Han et al.'s storage count of one layer's weights, in bits.

    Returns
    -------
    dict with ``weights`` (|W|), ``nonzero``, ``entries`` (non-zeros and fillers),
    ``fillers``, ``codebook_size`` K, ``codebook_bits`` (32 K; 0 for a raw layer),
    ``index_bits_fixed`` (entries × index bits), ``index_bits_huffman``,
    ``value_bits_fixed`` (entries × ⌈log2 K⌉, or 32 per entry for a raw layer) and
    ``value_bits_huffman`` (Huffman-coded indices, or 32 per entry for a raw layer).
    """
    flat = layer.indices.reshape(-1).cpu().numpy()
    skips, symbols, _ = sparse_entries(flat, index_bits=layer.index_bits)
    k = layer.codebook.numel()
    entries = len(skips)

    def huffman_bits(stream: np.ndarray, alphabet: int) -> int:
        counts = np.bincount(stream, minlength=alphabet)
        return int((counts * huffman_code_lengths(counts)).sum())

    raw_bits = 32 * entries
    return {
        "weights": len(flat),
        "nonzero": int((layer.weight != 0).sum()),
        "entries": entries,
        "fillers": int((symbols == 0).sum()),
        "codebook_size": k,
        "codebook_bits": 0 if layer.raw else 32 * k,
        "index_bits_fixed": entries * layer.index_bits,
        "index_bits_huffman": huffman_bits(skips, 1 << layer.index_bits),
        "value_bits_fixed": raw_bits if layer.raw else entries * max(1, math.ceil(math.log2(k))),
        "value_bits_huffman": raw_bits if layer.raw else huffman_bits(symbols, k),
    }


def storage_report(quantised: QuantisedNetwork, *, file_bytes: int | None = None) -> dict[str, Any]:
    """Sizes and rates of a quantised network (see the module's docstring for each rate).

    Parameters
    ----------
    quantised : QuantisedNetwork
    file_bytes : int, optional
        The compressed file's size; adds ``file_bytes`` and ``file_rate``.

    Returns
    -------
    dict with ``layers`` (each layer's :func:`layer_storage` plus ``nonzero_fraction`` and
    ``distinct_values``), ``weights`` |W|, ``nonzero``, ``nonzero_fraction``,
    ``distinct_values`` (over all layers, zero included), ``parameters`` (every parameter
    and buffer), ``han_huffman_bits``, ``han_fixed_bits``, ``han_huffman_rate``,
    ``han_fixed_rate``, ``parameter_rate``.
    """
    layers = {}
    for layer in quantised.layers:
        counts = layer_storage(layer)
        counts["nonzero_fraction"] = counts["nonzero"] / max(1, counts["weights"])
        counts["distinct_values"] = int(torch.unique(layer.weight).numel())
        layers[layer.name] = counts
    weights = sum(c["weights"] for c in layers.values())
    nonzero = sum(c["nonzero"] for c in layers.values())
    huffman = sum(c["codebook_bits"] + c["index_bits_huffman"] + c["value_bits_huffman"] for c in layers.values())
    fixed = sum(c["codebook_bits"] + c["index_bits_fixed"] + c["value_bits_fixed"] for c in layers.values())
    parameters = weights + sum(t.numel() for t in quantised.others.values())
    all_values = torch.cat([layer.weight.reshape(-1).cpu() for layer in quantised.layers])
    report: dict[str, Any] = {
        "layers": layers,
        "weights": weights,
        "nonzero": nonzero,
        "nonzero_fraction": nonzero / max(1, weights),
        "distinct_values": int(torch.unique(all_values).numel()),
        "parameters": parameters,
        "han_huffman_bits": huffman,
        "han_fixed_bits": fixed,
        "han_huffman_rate": 32 * weights / max(1, huffman),
        "han_fixed_rate": 32 * weights / max(1, fixed),
        "parameter_rate": weights / max(1, nonzero),
    }
    if file_bytes is not None:
        report["file_bytes"] = file_bytes
        report["file_rate"] = 32 * parameters / (8 * file_bytes)
    return report


# --------------------------------------------------------------------------- the file


def _float32_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().to(torch.float32).contiguous().numpy().astype("<f4").tobytes()


def encode_compressed(quantised: QuantisedNetwork) -> bytes:
    """The compressed file's bytes (see the module's docstring for the layout)."""
    blobs: list[bytes] = []
    layers_meta = []
    for layer in quantised.layers:
        flat = layer.indices.reshape(-1).cpu().numpy()
        skips, symbols, positions = sparse_entries(flat, index_bits=layer.index_bits)
        skip_lengths = huffman_code_lengths(np.bincount(skips, minlength=1 << layer.index_bits))
        skip_stream = _huffman_encode(skips, skip_lengths)
        if layer.raw:
            values = layer.weight.reshape(-1).cpu()[torch.as_tensor(positions)]
            codebook, value_stream, value_lengths = b"", _float32_bytes(values), []
        else:
            lengths = huffman_code_lengths(np.bincount(symbols, minlength=layer.codebook.numel()))
            codebook, value_stream, value_lengths = _float32_bytes(layer.codebook), _huffman_encode(symbols, lengths), lengths.tolist()
        blobs += [codebook, skip_stream, value_stream]
        layers_meta.append({
            "name": layer.name, "kind": layer.kind, "shape": list(layer.indices.shape), "raw": layer.raw,
            "entries": len(skips), "codebook_size": 0 if layer.raw else layer.codebook.numel(),
            "skip_lengths": skip_lengths.tolist(), "value_lengths": value_lengths,
            "bytes": [len(codebook), len(skip_stream), len(value_stream)],
        })
    others_meta = [{"name": name, "shape": list(t.shape)} for name, t in quantised.others.items()]
    blobs += [_float32_bytes(t) for t in quantised.others.values()]
    metadata = zlib.compress(json.dumps({"spec": quantised.spec, "data_shape": quantised.data_shape,
                                         "layers": layers_meta, "others": others_meta},
                                        separators=(",", ":")).encode(), 9)
    payload = metadata + b"".join(blobs)
    declared = sum(layer.indices.numel() for layer in quantised.layers)
    return _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(payload), len(metadata), zlib.crc32(payload), declared) + payload


def write_compressed(quantised: QuantisedNetwork, path: str | os.PathLike[str]) -> int:
    """Write the compressed file (whole or not at all); return its size in bytes."""
    path = Path(path)
    data = encode_compressed(quantised)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return len(data)


class _Reader:
    def __init__(self, data: bytes, offset: int) -> None:
        self.data, self.offset = data, offset

    def take(self, size: int) -> bytes:
        if size < 0 or self.offset + size > len(self.data):
            raise ValueError("a declared section runs past the end of the payload")
        chunk = self.data[self.offset:self.offset + size]
        self.offset += size
        return chunk

    def floats(self, count: int) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(self.take(4 * count), dtype="<f4").astype(np.float32))


def _decode_layer(meta: dict, reader: _Reader) -> QuantisedLayer:
    shape = [int(s) for s in meta["shape"]]
    numel = math.prod(shape)
    kind, entries, k = meta["kind"], int(meta["entries"]), int(meta["codebook_size"])
    if kind not in ("fc", "conv") or not 0 <= entries <= numel or not (meta["raw"] or 1 <= k <= 65536):
        raise ValueError(f"layer {meta['name']}: declared sizes out of range")
    codebook_bytes, skip_bytes, value_bytes = (int(b) for b in meta["bytes"])
    if codebook_bytes != 4 * k or (meta["raw"] and value_bytes != 4 * entries):
        raise ValueError(f"layer {meta['name']}: stream sizes do not match the declared counts")
    codebook = reader.floats(k)
    index_bits = CONV_INDEX_BITS if kind == "conv" else FC_INDEX_BITS
    skip_lengths = np.asarray(meta["skip_lengths"], dtype=np.int64)
    if len(skip_lengths) != 1 << index_bits:
        raise ValueError(f"layer {meta['name']}: index code table of the wrong size")
    skips = _huffman_decode(reader.take(skip_bytes), skip_lengths, entries)
    positions = np.cumsum(skips + 1) - 1
    if entries and positions[-1] >= numel:
        raise ValueError(f"layer {meta['name']}: entries run past the layer's {numel} weights")
    indices = torch.zeros(numel, dtype=torch.int64)
    if meta["raw"]:
        values = reader.floats(entries)
        real = values != 0
        codebook = torch.cat([torch.zeros(1), values[real]])
        indices[torch.as_tensor(positions)[real]] = torch.arange(1, int(real.sum()) + 1)
    else:
        value_lengths = np.asarray(meta["value_lengths"], dtype=np.int64)
        if len(value_lengths) != k:
            raise ValueError(f"layer {meta['name']}: value code table of the wrong size")
        indices[torch.as_tensor(positions)] = torch.as_tensor(
            _huffman_decode(reader.take(value_bytes), value_lengths, entries))
    return QuantisedLayer(name=meta["name"], kind=kind, indices=indices.reshape(shape), codebook=codebook,
                          raw=bool(meta["raw"]))


def read_compressed(path: str | os.PathLike[str]) -> QuantisedNetwork:
    """Read a compressed file back into a :class:`QuantisedNetwork`.

    Raises
    ------
    BayesSWSError
        In one line, if the file is missing, not a bayes-sws compressed file, of another
        format version, truncated, corrupt (checksum) or inconsistent with its declared sizes.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BayesSWSError(f"compressed file {path} not found") from None
    except OSError as error:
        raise BayesSWSError(f"cannot read compressed file {path}: {error.strerror}") from None
    if data[:4] != MAGIC:
        raise BayesSWSError(f"{path} is not a bayes-sws compressed file")
    if len(data) < _HEADER.size:
        raise BayesSWSError(f"compressed file {path} is truncated: {len(data)} bytes, shorter than its header")
    _, version, _, payload_size, metadata_size, checksum, declared = _HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        raise BayesSWSError(f"compressed file {path} has format version {version}; this bayes-sws reads {FORMAT_VERSION}")
    payload = data[_HEADER.size:]
    if len(payload) != payload_size:
        raise BayesSWSError(f"compressed file {path} is truncated or padded: {len(payload)} payload bytes, "
                            f"header declares {payload_size}")
    if zlib.crc32(payload) != checksum:
        raise BayesSWSError(f"compressed file {path} is corrupt (checksum mismatch)")
    try:
        if metadata_size > min(payload_size, _MAX_METADATA):
            raise ValueError("metadata larger than declared bounds")
        inflater = zlib.decompressobj()
        text = inflater.decompress(payload[:metadata_size], _MAX_METADATA)
        if inflater.unconsumed_tail:
            raise ValueError("metadata inflates past its bound")
        metadata = json.loads(text)
        reader = _Reader(payload, metadata_size)
        layers = [_decode_layer(meta, reader) for meta in metadata["layers"]]
        if sum(layer.indices.numel() for layer in layers) != declared:
            raise ValueError("layer sizes do not add up to the header's declared weights")
        others = {o["name"]: reader.floats(math.prod(o["shape"])).reshape(o["shape"]) for o in metadata["others"]}
        if reader.offset != len(payload):
            raise ValueError("bytes left over after the last section")
    except (ValueError, KeyError, TypeError, zlib.error) as error:
        raise BayesSWSError(f"compressed file {path} is inconsistent: {error}") from None
    return QuantisedNetwork(layers=layers, others=others, spec=metadata["spec"], data_shape=metadata["data_shape"])


def load_compressed(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A working torch module (eval mode) from a compressed file; see :func:`read_compressed`."""
    return read_compressed(path).to_network(device=device)
