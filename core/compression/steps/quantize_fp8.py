"""float8 (e4m3) weight-only quantization."""

from core.compression.configs.quantize import QuantizeFP8
from core.compression.quant.fp8 import quantize_fp8
from core.compression.quant.weights import quantize_selected
from core.compression.registry import register_step
from core.compression.state import ModelState, StepContext, StepReport


@register_step(QuantizeFP8)
def quantize_fp8_step(state: ModelState, config: QuantizeFP8, ctx: StepContext) -> StepReport:
    """Store each selected Linear (and Embedding) weight as float8 e4m3 with a float32 scale, in place.

    e4m3 keeps 3 mantissa bits over a wide exponent range, so it needs no calibration and no grid search; torch
    runs no fp8 matmul on CPU, so the loaded model computes with the decoded float weights.

    Example recipe step: `{"type": "quantize", "method": "fp8", "granularity": "per_channel"}`.
    """
    describe = f"stored as float8 e4m3 with {config.granularity} float32 scales"
    return quantize_selected(state, config, ctx, lambda w: quantize_fp8(w, config.granularity), 8, describe)
