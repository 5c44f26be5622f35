"""Bit packing of quantization codes: golden layouts and round trips for every width."""

import pytest
import torch

from core.compression.quant.packing import pack_bits, packed_size, unpack_bits


def test_int4_packs_two_codes_per_byte_low_nibble_first() -> None:
    packed = pack_bits(torch.tensor([1, 2, 3, 15, 0]), 4)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [0x21, 0xF3, 0x00]


def test_int2_packs_four_codes_per_byte() -> None:
    assert pack_bits(torch.tensor([0, 1, 2, 3]), 2).tolist() == [0b11100100]


def test_int3_is_a_bit_stream_of_three_bytes_per_eight_codes() -> None:
    codes = torch.arange(8)
    packed = pack_bits(codes, 3)
    stream = sum(int(code) << (3 * index) for index, code in enumerate(codes))
    assert packed.tolist() == [(stream >> (8 * byte)) & 0xFF for byte in range(3)]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 7, 8, 9, 1001])
def test_round_trip_for_every_width(bits: int, count: int) -> None:
    codes = torch.randint(0, 2**bits, (count,), generator=torch.Generator().manual_seed(bits * count))
    packed = pack_bits(codes, bits)
    assert packed.numel() == packed_size(count, bits)
    assert torch.equal(unpack_bits(packed, bits, count), codes.to(torch.uint8))


def test_packed_sizes() -> None:
    assert packed_size(64, 4) == 32 and packed_size(65, 4) == 33
    assert packed_size(8, 3) == 3 and packed_size(9, 3) == 6


def test_bad_widths_and_lengths_are_rejected() -> None:
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.tensor([1]), 9)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 8)
