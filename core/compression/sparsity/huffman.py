"""Canonical Huffman coding of 8-bit integer tensors, vectorised with numpy, and the `huffman` encoding format.

Code lengths are limited to 16 bits so that decoding is a table lookup on a 16-bit window. The symbol stream is
cut into chunks of `chunk` symbols whose starting bit offsets are stored, and all chunks are decoded in lockstep:
`chunk` numpy steps over vectors of (count / chunk) positions instead of one Python step per symbol.
"""

import heapq
import math
from itertools import count as counter
from typing import Any

import numpy as np
import torch

from core.compression.encoding import decode, register_decoder
from core.compression.state import Encoding

HUFFMAN = "huffman"
MAX_LENGTH = 16
_CODABLE = {torch.int8: np.int8, torch.uint8: np.uint8}


def code_lengths(counts: np.ndarray) -> np.ndarray:
    """Huffman code length per symbol (0 for absent symbols), at most MAX_LENGTH bits."""
    counts = counts.astype(np.int64)
    while True:
        lengths = _unlimited_lengths(counts)
        if lengths.max() <= MAX_LENGTH:
            return lengths
        # Too skewed: flatten the distribution (rare symbols get relatively more weight) and rebuild.
        counts = np.where(counts > 0, (counts + 1) // 2, 0)


def _unlimited_lengths(counts: np.ndarray) -> np.ndarray:
    present = np.flatnonzero(counts)
    lengths = np.zeros(len(counts), dtype=np.int64)
    if len(present) == 1:
        lengths[present] = 1
        return lengths
    tie = counter()
    heap = [(int(counts[s]), next(tie), [int(s)]) for s in present]
    heapq.heapify(heap)
    while len(heap) > 1:
        weight_a, _, symbols_a = heapq.heappop(heap)
        weight_b, _, symbols_b = heapq.heappop(heap)
        lengths[symbols_a + symbols_b] += 1
        heapq.heappush(heap, (weight_a + weight_b, next(tie), symbols_a + symbols_b))
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical codes: symbols sorted by (length, value) get consecutive codes, so lengths alone define them."""
    codes = np.zeros(len(lengths), dtype=np.int64)
    code, previous = 0, 0
    for symbol in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[symbol]) - previous
        codes[symbol], previous = code, int(lengths[symbol])
        code += 1
    return codes


def encode_symbols(symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(packed bits, chunk start offsets in bits, code lengths per symbol value, chunk size) for uint8 `symbols`."""
    lengths = code_lengths(np.bincount(symbols, minlength=256))
    codes = canonical_codes(lengths)
    symbol_lengths, symbol_codes = lengths[symbols], codes[symbols]
    starts = np.cumsum(symbol_lengths) - symbol_lengths
    bits = np.zeros(int(symbol_lengths.sum()), dtype=np.uint8)
    for bit in range(int(lengths.max())):
        has = symbol_lengths > bit
        bits[starts[has] + bit] = (symbol_codes[has] >> (symbol_lengths[has] - 1 - bit)) & 1
    chunk = max(16, math.isqrt(len(symbols)))
    return np.packbits(bits), starts[::chunk].astype(np.int64), lengths, chunk


def decode_symbols(packed: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, chunk: int, total: int) -> np.ndarray:
    """The `total` uint8 symbols coded by `encode_symbols`."""
    table_symbol, table_length = _lookup_tables(lengths)
    padded = np.concatenate([packed, np.zeros(4, dtype=np.uint8)]).astype(np.uint32)
    # A 32-bit big-endian word starting at every byte: any 16-bit window lies inside the word of its first byte.
    words = (padded[:-3] << 24) | (padded[1:-2] << 16) | (padded[2:-1] << 8) | padded[3:]
    end_bit = len(packed) * 8
    positions = offsets.copy()
    out = np.empty((chunk, len(offsets)), dtype=np.uint8)
    for step in range(chunk):
        window = (words[positions >> 3] >> (16 - (positions & 7))) & 0xFFFF
        out[step] = table_symbol[window]
        positions = np.minimum(positions + table_length[window], end_bit - 1)
    return out.T.reshape(-1)[:total]


def _lookup_tables(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every 16-bit window: the symbol whose code starts it, and that code's length."""
    codes = canonical_codes(lengths)
    symbols = np.zeros(1 << MAX_LENGTH, dtype=np.uint8)
    sizes = np.ones(1 << MAX_LENGTH, dtype=np.int64)
    for symbol in np.flatnonzero(lengths):
        shift = MAX_LENGTH - int(lengths[symbol])
        start = int(codes[symbol]) << shift
        symbols[start : start + (1 << shift)] = symbol
        sizes[start : start + (1 << shift)] = lengths[symbol]
    return symbols, sizes


def huffman_encoding(inner: Encoding) -> Encoding | None:
    """`inner` with each 8-bit integer tensor Huffman-coded where that is smaller; None if none is."""
    tensors: dict[str, torch.Tensor] = {}
    coded: dict[str, dict[str, Any]] = {}
    for key, tensor in inner.tensors.items():
        entry = _code_tensor(tensor) if tensor.dtype in _CODABLE and tensor.numel() else None
        if entry is None:
            tensors[f"raw.{key}"] = tensor
            continue
        bits, offsets, record = entry
        tensors[f"huff.{key}.bits"], tensors[f"huff.{key}.offsets"] = bits, offsets
        coded[key] = record
    if not coded:
        return None
    meta = {"inner_format": inner.format, "inner_meta": inner.meta, "coded": coded}
    return Encoding(format=HUFFMAN, tensors=tensors, meta=meta)


def _code_tensor(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]] | None:
    symbols = tensor.contiguous().numpy().reshape(-1).view(np.uint8)
    packed, offsets, lengths, chunk = encode_symbols(symbols)
    if packed.nbytes + offsets.nbytes >= symbols.nbytes:
        return None
    present = np.flatnonzero(lengths)
    record = {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape), "chunk": chunk,
              "symbols": present.tolist(), "lengths": lengths[present].tolist()}
    return torch.from_numpy(packed), torch.from_numpy(offsets), record


@register_decoder(HUFFMAN)
def _decode_huffman(encoding: Encoding) -> torch.Tensor:
    return decode(inner_encoding(encoding))


def inner_encoding(encoding: Encoding) -> Encoding:
    """The encoding that was Huffman-coded, with its integer tensors decoded bit-exactly."""
    tensors = {key.removeprefix("raw."): t for key, t in encoding.tensors.items() if key.startswith("raw.")}
    for key, record in encoding.meta["coded"].items():
        lengths = np.zeros(256, dtype=np.int64)
        lengths[record["symbols"]] = record["lengths"]
        total = math.prod(record["shape"])
        symbols = decode_symbols(encoding.tensors[f"huff.{key}.bits"].numpy(),
                                 encoding.tensors[f"huff.{key}.offsets"].numpy(), lengths, record["chunk"], total)
        values = symbols.view(np.dtype(record["dtype"])).reshape(record["shape"])
        tensors[key] = torch.from_numpy(values.copy())
    return Encoding(format=encoding.meta["inner_format"], tensors=tensors, meta=encoding.meta["inner_meta"])
