"""Packed weight formats: how a float weight becomes the tensors an artifact stores, and back.

Each format has a name (`Encoding.format`) and one registered decoder, so the loader turns any stored encoding back
into a float tensor without knowing which step produced it.
"""

from collections.abc import Callable
from typing import Literal

import torch

from core.compression.state import Encoding
from core.errors import UnsupportedModel

Granularity = Literal["per_tensor", "per_channel"]
Decoder = Callable[[Encoding], torch.Tensor]

INT8_RTN = "int8_rtn"

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
    weight: torch.Tensor, bits: int = 8, granularity: Granularity = "per_channel", symmetric: bool = True
) -> Encoding:
    """Round-to-nearest linear quantization of `weight` into int8 codes plus float32 scales.

    q = clamp(round(w / scale) + zero_point, qmin, qmax) and w ≈ (q - zero_point) · scale. `per_channel` keeps one
    scale per output row (dim 0; one per token for an embedding table), `per_tensor` one for the whole tensor.
    Symmetric: scale = max|w| / 127, codes in [-127, 127], no zero point. Asymmetric: scale = (max - min) / 255
    with an int8 zero point, codes in [-128, 127].

    Example: `decode(quantize_rtn(linear.weight))` is the weight an int8 artifact computes with.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be between 2 and 8 to fit int8 codes, got {bits}")
    w = weight.detach().to(torch.float32)
    low, high = _value_range(w, granularity)
    tensors = _symmetric(w, high.maximum(-low), bits) if symmetric else _asymmetric(w, low, high, bits)
    meta = {"bits": bits, "granularity": granularity, "symmetric": symmetric}
    return Encoding(format=INT8_RTN, tensors=tensors, meta=meta)


@register_decoder(INT8_RTN)
def _decode_int8_rtn(encoding: Encoding) -> torch.Tensor:
    codes = encoding.tensors["qweight"].to(torch.float32)
    zero_point = encoding.tensors.get("zero_point")
    if zero_point is not None:
        codes = codes - zero_point.to(torch.float32)
    return codes * encoding.tensors["scale"]


def _value_range(w: torch.Tensor, granularity: Granularity) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (or whole-tensor) min and max, kept broadcastable against `w`."""
    if granularity == "per_channel":
        dims = tuple(range(1, w.ndim))
    elif granularity == "per_tensor":
        dims = tuple(range(w.ndim))
    else:
        raise ValueError(f"granularity must be per_tensor or per_channel, got {granularity!r}")
    return w.amin(dim=dims, keepdim=True), w.amax(dim=dims, keepdim=True)


def _symmetric(w: torch.Tensor, max_abs: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    qmax = 2 ** (bits - 1) - 1
    scale = _nonzero(max_abs / qmax)
    codes = torch.clamp(torch.round(w / scale), -qmax, qmax)
    return {"qweight": codes.to(torch.int8), "scale": scale}


def _asymmetric(w: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    # The range always spans 0 so that the zero point is an integer inside [qmin, qmax] and 0.0 decodes exactly.
    low, high = low.clamp(max=0), high.clamp(min=0)
    scale = _nonzero((high - low) / (qmax - qmin))
    zero_point = torch.clamp(qmin - torch.round(low / scale), qmin, qmax)
    codes = torch.clamp(torch.round(w / scale) + zero_point, qmin, qmax)
    return {"qweight": codes.to(torch.int8), "scale": scale, "zero_point": zero_point.to(torch.int8)}


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    # An all-zero row has no range; scale 1 encodes it as code 0 (or the zero point) instead of 0 / 0 = NaN.
    return torch.where(scale > 0, scale, torch.ones_like(scale))
