"""Packed weight formats: how a float weight becomes the tensors an artifact stores, and back.

Each format has a name (`Encoding.format`) and one registered decoder, so the loader turns any stored encoding back
into a float tensor without knowing which step produced it.
"""

from collections.abc import Callable
from typing import Literal

import torch

from core.compression.quant.grid import GridParams, IntGrid, dequantize_codes, grid_params, quantize_codes
from core.compression.quant.packing import pack_bits, unpack_bits
from core.compression.quant.threads import over_row_blocks
from core.compression.state import Encoding
from core.errors import UnsupportedModel

Granularity = Literal["per_tensor", "per_channel", "per_group"]
Decoder = Callable[[Encoding], torch.Tensor]

INT8_RTN = "int8_rtn"
PACKED_INT = "packed_int"

_DECODERS: dict[str, Decoder] = {}


def register_decoder(format_name: str) -> Callable[[Decoder], Decoder]:
    """Decorator: `@register_decoder("int8_rtn")` makes the function the decoder for that format name."""

    def decorate(decoder: Decoder) -> Decoder:
        if format_name in _DECODERS:
            raise RuntimeError(f"a decoder for format {format_name!r} is already registered")
        _DECODERS[format_name] = decoder
        return decoder

    return decorate


def decode(encoding: Encoding) -> torch.Tensor:
    """The float32 weight an encoding stands for (what the compressed model computes with)."""
    from core.compression.registry import load_step_modules

    load_step_modules()  # formats are registered next to the steps that write them
    try:
        decoder = _DECODERS[encoding.format]
    except KeyError:
        raise UnsupportedModel(f"unknown weight encoding format {encoding.format!r}") from None
    return decoder(encoding)


def quantize_rtn(
    weight: torch.Tensor,
    bits: int = 8,
    granularity: Granularity = "per_channel",
    symmetric: bool = True,
    group_size: int | None = None,
) -> Encoding:
    """Round-to-nearest linear quantization of `weight`: q = clamp(round(w / scale) + zero_point, qmin, qmax) and
    w ≈ (q - zero_point) · scale, with one scale (and zero point) per tensor, output row or group of columns.

    8 bits per row or tensor keeps the original `int8_rtn` format: int8 codes and float32 scales (symmetric:
    scale = max|w| / 127, codes in [-127, 127]; asymmetric: scale = (max - min) / 255, int8 zero point). Fewer bits,
    or groups of `group_size` columns (`per_group`), give the `packed_int` format: unsigned codes bit-packed
    (two int4 codes per byte), float16 scales, uint8 zero points (see `core.compression.quant.grid`).

    Example: `decode(quantize_rtn(linear.weight, bits=4, granularity="per_group", group_size=64))`.
    """
    if bits == 8 and granularity != "per_group":
        return _quantize_int8(weight, granularity, symmetric)
    grid = IntGrid(bits=bits, symmetric=symmetric, granularity=granularity, group_size=group_size)
    return quantize_packed_int(weight, grid)


def quantize_rtn_(
    weight: torch.Tensor,
    bits: int = 8,
    granularity: Granularity = "per_channel",
    symmetric: bool = True,
    group_size: int | None = None,
) -> Encoding:
    """`quantize_rtn`, then overwrite `weight` with what the encoding decodes to (what the artifact computes).

    Symmetric per-row int8 of a contiguous float32 matrix does both in one pass per block of rows, so the weight is
    read and written once while the block is in cache; anything else encodes, then decodes into `weight`.
    """
    w = weight.detach()
    if bits == 8 and granularity == "per_channel" and symmetric and _fits_rows_fast_path(w):
        # Decoded into new memory, then swapped in: a freshly loaded weight is a copy-on-write mapping of its
        # safetensors file, and the first write into each of its pages costs a fault and a copy (bench.rtn_throughput
        # on SmolLM2: 0.70 s in place, 0.30-0.48 s into new memory). The Parameter object stays, so tied modules stay
        # tied.
        decoded = torch.empty_like(w)
        tensors = _symmetric_rows_int8(w, decoded=decoded)
        weight.data = decoded
        return Encoding(format=INT8_RTN, tensors=tensors, meta={"bits": 8, "granularity": granularity,
                                                                 "symmetric": True})
    encoding = quantize_rtn(w, bits, granularity, symmetric, group_size)
    decode_into(encoding, w)
    return encoding


def _fits_rows_fast_path(w: torch.Tensor) -> bool:
    return w.ndim == 2 and w.dtype == torch.float32 and w.is_contiguous()


def quantize_packed_int(weight: torch.Tensor, grid: IntGrid) -> Encoding:
    """Round-to-nearest quantization of a 2-D weight onto `grid`, stored in the `packed_int` format."""
    if weight.ndim != 2:
        raise ValueError(f"packed_int needs a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32)
    params = grid_params(w, grid)
    return packed_int_encoding(quantize_codes(w, params, grid), params, grid)


def packed_int_encoding(codes: torch.Tensor, params: GridParams, grid: IntGrid) -> Encoding:
    """The `packed_int` encoding of unsigned `codes` (rows x columns) on `grid` (used by rtn and gptq)."""
    tensors = {"qweight": pack_bits(codes, grid.bits), "scale": params.scale}
    if params.zero_point is not None:
        tensors["zero_point"] = params.zero_point
    meta = {
        "bits": grid.bits,
        "shape": list(codes.shape),
        "granularity": grid.granularity,
        "group_size": grid.group_size,
        "symmetric": grid.symmetric,
    }
    return Encoding(format=PACKED_INT, tensors=tensors, meta=meta)


@register_decoder(PACKED_INT)
def _decode_packed_int(encoding: Encoding) -> torch.Tensor:
    meta = encoding.meta
    grid = IntGrid(meta["bits"], meta["symmetric"], meta["granularity"], meta["group_size"])
    rows, columns = meta["shape"]
    codes = unpack_bits(encoding.tensors["qweight"], grid.bits, rows * columns).view(rows, columns)
    params = GridParams(encoding.tensors["scale"], encoding.tensors.get("zero_point"))
    return dequantize_codes(codes, params, grid)


def _quantize_int8(weight: torch.Tensor, granularity: Granularity, symmetric: bool) -> Encoding:
    w = weight.detach().to(torch.float32)
    if symmetric and granularity == "per_channel" and w.ndim == 2:
        tensors = _symmetric_rows_int8(w)
    else:
        low, high = _value_range(w, granularity)
        tensors = _symmetric(w, high.maximum(-low), 8) if symmetric else _asymmetric(w, low, high, 8)
    meta = {"bits": 8, "granularity": granularity, "symmetric": symmetric}
    return Encoding(format=INT8_RTN, tensors=tensors, meta=meta)


@register_decoder(INT8_RTN)
def _decode_int8_rtn(encoding: Encoding) -> torch.Tensor:
    codes, scale = encoding.tensors["qweight"], encoding.tensors["scale"]
    zero_point = encoding.tensors.get("zero_point")
    if zero_point is None:
        return torch.mul(codes, scale)  # int8 x float32 promotes to float32 in one pass
    return codes.to(torch.float32).sub_(zero_point).mul_(scale)


def decode_into(encoding: Encoding, out: torch.Tensor) -> None:
    """Write the weight `encoding` stands for into `out` (a model's Parameter data). Symmetric int8, the default
    format, is decoded straight into `out`'s memory: one pass and no temporary the size of the model's weights."""
    if encoding.format == INT8_RTN and "zero_point" not in encoding.tensors and out.dtype == torch.float32:
        codes, scale = encoding.tensors["qweight"], encoding.tensors["scale"]
        if out.device == codes.device and out.is_contiguous() and out.shape == codes.shape and codes.ndim == 2:
            over_row_blocks(*codes.shape, lambda start, stop: torch.mul(codes[start:stop], scale[start:stop],
                                                                        out=out[start:stop]))
            return
    out.copy_(decode(encoding))


def _value_range(w: torch.Tensor, granularity: Granularity) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (or whole-tensor) min and max, kept broadcastable against `w`."""
    if granularity == "per_tensor":
        return w.min().view((1,) * w.ndim), w.max().view((1,) * w.ndim)
    if granularity != "per_channel":
        raise ValueError(f"granularity must be per_tensor or per_channel for int8_rtn, got {granularity!r}")
    low, high = torch.aminmax(w.reshape(w.shape[0], -1), dim=1)  # one pass over the weight instead of two
    shape = (-1, *(1,) * (w.ndim - 1))
    return low.view(shape), high.view(shape)


def _symmetric_rows_int8(w: torch.Tensor, decoded: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Symmetric per-row int8 of a 2-D weight, by blocks of rows: each block's temporaries stay in cache, so the
    weight is read from memory once (about 3x faster than whole-tensor passes on SmolLM2). With `decoded` (which
    may be `w` itself), each block's decoded values are written there as soon as its codes are known."""
    codes = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], 1, device=w.device)

    def encode_rows(start: int, stop: int) -> None:
        block = w[start:stop]
        # max|w| from the row's max and min: two reads of the block in cache, no |w| temporary to write.
        high = torch.maximum(block.amax(dim=1, keepdim=True), block.amin(dim=1, keepdim=True).neg_())
        block_scale = _nonzero(high.div_(127))
        # |w| <= max|w| = 127 * scale: the product rounds into [-127, 127] without a clamp.
        work = torch.mul(block, block_scale.reciprocal()).round_()
        codes[start:stop] = work
        scale[start:stop] = block_scale
        if decoded is not None:  # the same product decode() computes from the int8 codes
            torch.mul(work, block_scale, out=decoded[start:stop])

    over_row_blocks(w.shape[0], w.shape[1], encode_rows)
    return {"qweight": codes, "scale": scale}


def _symmetric(w: torch.Tensor, max_abs: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    qmax = 2 ** (bits - 1) - 1
    scale = _nonzero(max_abs / qmax)
    codes = torch.div(w, scale).round_().clamp_(-qmax, qmax)  # in place: this runs over every weight of the model
    return {"qweight": codes.to(torch.int8), "scale": scale}


def _asymmetric(w: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    # The range always spans 0 so that the zero point is an integer inside [qmin, qmax] and 0.0 decodes exactly.
    low, high = low.clamp(max=0), high.clamp(min=0)
    scale = _nonzero((high - low) / (qmax - qmin))
    zero_point = torch.clamp(qmin - torch.round(low / scale), qmin, qmax)
    codes = torch.div(w, scale).round_().add_(zero_point).clamp_(qmin, qmax)
    return {"qweight": codes.to(torch.int8), "scale": scale, "zero_point": zero_point.to(torch.int8)}



def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    # An all-zero row has no range; scale 1 encodes it as code 0 (or the zero point) instead of 0 / 0 = NaN.
    return torch.where(scale > 0, scale, torch.ones_like(scale))
