"""Bit packing of unsigned integer codes: `bits`-bit codes stored back to back, least significant bit first.

Widths that divide 8 (1, 2, 4, 8) pack whole codes into each byte (two int4 codes per byte: low nibble first);
other widths (3, 5, 6, 7) use a bit stream in which 8 codes fill exactly `bits` bytes.
"""

import torch


def packed_size(count: int, bits: int) -> int:
    """Bytes that `count` codes of `bits` bits take once packed."""
    if 8 % bits == 0:
        return -(-count // (8 // bits))
    return -(-count // 8) * bits


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flatten `codes` (integers in [0, 2**bits)) into a 1-D uint8 tensor of `packed_size(codes.numel(), bits)`.

    Example: `pack_bits(torch.tensor([1, 2, 3]), 4)` is `tensor([0x21, 0x03], dtype=torch.uint8)`.
    """
    _check_bits(bits)
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    if 8 % bits == 0:
        return _pack_whole(flat, bits)
    return _pack_stream(flat, bits)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first `count` codes of `packed` as a 1-D uint8 tensor: the inverse of `pack_bits`."""
    _check_bits(bits)
    if packed.numel() != packed_size(count, bits):
        raise ValueError(f"{packed.numel()} packed bytes cannot hold exactly {count} codes of {bits} bits")
    if bits == 8:
        return packed.reshape(-1).clone()
    if 8 % bits == 0:
        return _unpack_whole(packed, bits)[:count]
    return _unpack_stream(packed, bits)[:count]


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be between 1 and 8, got {bits}")


def _pack_whole(flat: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    padded = torch.nn.functional.pad(flat, (0, -flat.numel() % per_byte)).view(-1, per_byte)
    packed = torch.zeros(padded.shape[0], dtype=torch.uint8, device=flat.device)
    for slot in range(per_byte):  # a few shifts over the whole tensor: vectorised, no per-code Python
        packed |= padded[:, slot] << (slot * bits)
    return packed


def _unpack_whole(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte, mask = 8 // bits, (1 << bits) - 1
    slots = [(packed >> (slot * bits)) & mask for slot in range(per_byte)]
    return torch.stack(slots, dim=1).reshape(-1)


def _pack_stream(flat: torch.Tensor, bits: int) -> torch.Tensor:
    # 8 codes of `bits` bits make one word of `bits` bytes (at most 56 bits: int64 holds it).
    padded = torch.nn.functional.pad(flat, (0, -flat.numel() % 8)).view(-1, 8).to(torch.int64)
    words = torch.zeros(padded.shape[0], dtype=torch.int64, device=flat.device)
    for slot in range(8):
        words |= padded[:, slot] << (slot * bits)
    return torch.stack([(words >> (8 * byte)) & 0xFF for byte in range(bits)], dim=1).to(torch.uint8).reshape(-1)


def _unpack_stream(packed: torch.Tensor, bits: int) -> torch.Tensor:
    rows = packed.view(-1, bits).to(torch.int64)
    words = torch.zeros(rows.shape[0], dtype=torch.int64, device=packed.device)
    for byte in range(bits):
        words |= rows[:, byte] << (8 * byte)
    mask = (1 << bits) - 1
    return torch.stack([(words >> (slot * bits)) & mask for slot in range(8)], dim=1).to(torch.uint8).reshape(-1)
