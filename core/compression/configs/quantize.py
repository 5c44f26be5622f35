"""Quantization step configs: `{"type": "quantize", "method": ...}`."""

from typing import Literal

from core.compression.configs.base import StepConfig


class QuantizeRTN(StepConfig):
    """Round-to-nearest weight-only quantization of `nn.Linear` and `nn.Embedding` weights.

    q = clamp(round(w / scale) + zero_point) with one scale (and zero point when asymmetric) per output channel
    or per tensor; stored packed as int8 plus scales, so the file really shrinks.

    Example: `{"type": "quantize", "method": "rtn", "bits": 8, "granularity": "per_channel", "symmetric": true}`
    """

    type: Literal["quantize"] = "quantize"
    method: Literal["rtn"] = "rtn"
    bits: Literal[8] = 8
    granularity: Literal["per_tensor", "per_channel"] = "per_channel"
    symmetric: bool = True
    include_embeddings: bool = True


# Every config of this family; `core.compression.spec` tags each one `quantize:<method>`.
CONFIGS = (QuantizeRTN,)
