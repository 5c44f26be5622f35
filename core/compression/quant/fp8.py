"""float8 e4m3 weight-only storage: w ≈ float(fp8(w / scale)) · scale, with float32 scales per row or tensor.

torch has `float8_e4m3fn` on CPU as a storage dtype (casting works, matmul does not), and safetensors writes it
natively (`F8_E4M3`), so the artifact holds one byte per weight and decodes to float on load.
"""

from typing import Literal

import torch

from core.compression.encoding import register_decoder
from core.compression.state import Encoding

FP8_E4M3 = "fp8_e4m3"
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


@torch.no_grad()
def quantize_fp8(weight: torch.Tensor, granularity: Literal["per_tensor", "per_channel"]) -> Encoding:
    """The `fp8_e4m3` encoding of a weight: the largest magnitude of each row (or the tensor) maps to 448.

    Example: `decode(quantize_fp8(linear.weight, "per_channel"))`.
    """
    w = weight.detach().float()
    dims = tuple(range(1, w.ndim)) if granularity == "per_channel" else tuple(range(w.ndim))
    max_abs = w.abs().amax(dim=dims, keepdim=True)
    # An all-zero row has no range: scale 1 stores it as exact zeros instead of 0 / 0 = NaN.
    scale = torch.where(max_abs > 0, max_abs / E4M3_MAX, torch.ones_like(max_abs))
    codes = (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return Encoding(FP8_E4M3, {"qweight": codes, "scale": scale}, {"granularity": granularity})


@register_decoder(FP8_E4M3)
def _decode_fp8(encoding: Encoding) -> torch.Tensor:
    return encoding.tensors["qweight"].float() * encoding.tensors["scale"]
