"""Huffman coding: bit-exact round trips of 8-bit integer tensors, code-length limits, and the encode step."""

from pathlib import Path

import numpy as np
import pytest
import torch

from core.compression.encoding import decode, quantize_rtn
from core.compression.metrics import probe_inputs
from core.compression.sparsity.huffman import (
    MAX_LENGTH,
    code_lengths,
    decode_symbols,
    encode_symbols,
    huffman_encoding,
    inner_encoding,
)
from core.errors import InvalidSpec
from tests.core.pruning_helpers import assert_reload_identical, run_steps
from tests.models import tiny_bert


@pytest.mark.parametrize("size", [1, 17, 1000, 100_000])
@pytest.mark.parametrize("spread", [0.5, 5.0, 60.0])
def test_symbols_round_trip(size: int, spread: float) -> None:
    rng = np.random.default_rng(size)
    symbols = np.clip(np.round(rng.normal(0, spread, size)), -127, 127).astype(np.int8).view(np.uint8)
    packed, offsets, lengths, chunk = encode_symbols(symbols)
    assert np.array_equal(decode_symbols(packed, offsets, lengths, chunk, size), symbols)


def test_skewed_counts_are_limited_to_the_maximum_length() -> None:
    counts = np.zeros(256, dtype=np.int64)
    counts[:40] = [int(1.6**i) + 1 for i in range(40)]  # Fibonacci-like: unlimited codes would be ~40 bits
    lengths = code_lengths(counts)
    assert lengths.max() <= MAX_LENGTH
    assert sum(2.0 ** -lengths[lengths > 0]) <= 1.0  # Kraft: still a prefix code
    symbols = np.repeat(np.arange(40, dtype=np.uint8), 3)
    packed, offsets, lengths, chunk = encode_symbols(symbols)
    assert np.array_equal(decode_symbols(packed, offsets, lengths, chunk, len(symbols)), symbols)


def test_encoding_wrapper_is_bit_exact_and_smaller() -> None:
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    inner = quantize_rtn(weight)
    coded = huffman_encoding(inner)
    assert coded is not None and coded.nbytes() < inner.nbytes()
    assert torch.equal(inner_encoding(coded).tensors["qweight"], inner.tensors["qweight"])
    assert torch.equal(decode(coded), decode(inner))


def test_encode_step_after_prune_and_quantize_round_trips(tmp_path: Path) -> None:
    state, reports = run_steps(tiny_bert(), {"type": "prune", "include_embeddings": True}, {"type": "quantize"},
                               {"type": "encode", "method": "huffman"})
    # The quantize step keeps the pruning mask, so only kept values are int8 codes; Huffman never makes them larger.
    assert {e.format for e in state.encodings.values()} <= {"sparse_bitmask", "huffman"}
    assert 0 < reports[-1].metrics["stored_ratio"] <= 1.0
    assert_reload_identical(state, tmp_path, probe_inputs(state.model))


def test_encode_without_packed_weights_is_an_invalid_spec() -> None:
    with pytest.raises(InvalidSpec, match="no packed weight"):
        run_steps(tiny_bert(), {"type": "encode"})
