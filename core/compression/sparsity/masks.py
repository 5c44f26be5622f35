"""Sparse storage: a pruned weight is stored as a bitmask of its kept positions plus the kept values only.

The `sparse_bitmask` format wraps an inner encoding: every inner tensor with the weight's shape (the float values,
or a quantizer's integer codes) is stored compacted to the kept positions, other inner tensors (scales) as they are.
Decoding rebuilds the inner tensors, decodes them and forces the pruned positions to exactly zero. So a later
quantization step keeps both savings by wrapping its own encoding: `keep_sparse(state, name, encoding)`.
"""

import torch

from core.compression.encoding import decode, register_decoder
from core.compression.quant.packing import pack_bits as pack_codes
from core.compression.quant.packing import unpack_bits as unpack_codes
from core.compression.state import Encoding, ModelState

SPARSE_BITMASK = "sparse_bitmask"
DENSE_FLOAT = "dense_float"
_INNER = "inner."
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bytes, 8 positions per byte, most significant bit first (numpy.packbits order)."""
    flat = mask.flatten().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    numel = int(torch.Size(shape).numel())
    bits = packed.unsqueeze(1).bitwise_and(_BIT_WEIGHTS.to(packed.device)).ne(0).flatten()
    return bits[:numel].view(*shape)


def dense_float(weight: torch.Tensor) -> Encoding:
    """The weight as plain float32: the inner encoding of a pruned weight that is not quantized."""
    return Encoding(format=DENSE_FLOAT, tensors={"weight": weight.detach().to(torch.float32).contiguous()})


@register_decoder(DENSE_FLOAT)
def _decode_dense_float(encoding: Encoding) -> torch.Tensor:
    return encoding.tensors["weight"]


def sparse_encoding(mask: torch.Tensor, inner: Encoding) -> Encoding:
    """Wrap `inner` (an encoding of the whole weight) so that only the positions where `mask` is True are stored.

    Inner tensors of the weight's shape are compacted, and so are the bit-packed code tensors that `inner.meta`
    lists under "packed" (one `inner.meta["bits"]`-bit code per position, e.g. k-means indices)."""
    shape = list(mask.shape)
    tensors = {"mask": pack_bits(mask)}
    compacted, packed = [], []
    for key, tensor in inner.tensors.items():
        if list(tensor.shape) == shape:
            tensors[_INNER + key] = tensor[mask].contiguous()
            compacted.append(key)
        elif key in inner.meta.get("packed", ()):
            codes = unpack_codes(tensor, inner.meta["bits"], mask.numel())
            tensors[_INNER + key] = pack_codes(codes[mask.flatten()], inner.meta["bits"])
            packed.append(key)
        else:
            tensors[_INNER + key] = tensor
    meta = {"shape": shape, "inner_format": inner.format, "inner_meta": inner.meta, "compacted": compacted,
            "compacted_packed": packed}
    return Encoding(format=SPARSE_BITMASK, tensors=tensors, meta=meta)


def unwrap(encoding: Encoding) -> tuple[torch.Tensor, Encoding]:
    """(mask, inner encoding with full-shape tensors) of a `sparse_bitmask` encoding."""
    mask = unpack_bits(encoding.tensors["mask"], encoding.meta["shape"])
    tensors = {}
    for key, tensor in encoding.tensors.items():
        if not key.startswith(_INNER):
            continue
        name = key.removeprefix(_INNER)
        if name in encoding.meta["compacted"]:
            full = tensor.new_zeros(mask.shape)
            full[mask] = tensor
            tensor = full
        elif name in encoding.meta.get("compacted_packed", ()):
            bits = encoding.meta["inner_meta"]["bits"]
            codes = torch.zeros(mask.numel(), dtype=torch.uint8)
            codes[mask.flatten()] = unpack_codes(tensor, bits, int(mask.sum()))
            tensor = pack_codes(codes, bits)
        tensors[name] = tensor
    return mask, Encoding(format=encoding.meta["inner_format"], tensors=tensors, meta=encoding.meta["inner_meta"])


@register_decoder(SPARSE_BITMASK)
def _decode_sparse_bitmask(encoding: Encoding) -> torch.Tensor:
    mask, inner = unwrap(encoding)
    # Pruned positions are exactly zero whatever the inner format decodes a filler code to.
    return torch.where(mask, decode(inner), torch.zeros((), dtype=torch.float32))


def mask_of(state: ModelState, param_name: str) -> torch.Tensor | None:
    """The kept-positions mask of a pruned parameter stored sparse (True = kept), or None if it is not."""
    encoding = state.encodings.get(param_name)
    if encoding is None or encoding.format != SPARSE_BITMASK:
        return None
    return unpack_bits(encoding.tensors["mask"], encoding.meta["shape"])


def keep_sparse(state: ModelState, param_name: str, encoding: Encoding) -> Encoding:
    """What a later step must store for `param_name` instead of `encoding` so that pruned zeros stay zero and
    stay unstored: `encoding` wrapped with the parameter's existing mask, or `encoding` itself if it was not pruned.

    Call it before writing the decoded value back into the live weight, e.g. in a quantize step:
    `encoding = keep_sparse(state, name, quantize_rtn(weight)); weight.copy_(decode(encoding))`.
    """
    mask = mask_of(state, param_name)
    return encoding if mask is None else sparse_encoding(mask, encoding)
