"""float8 (e4m3) weight-only quantization."""

from core.compression.configs.quantize import QuantizeFP8
from core.compression.quant.fp8 import quantize_fp8
from core.compression.quant.modules import (
    SharedWeight,
    encode_each,
    select_modules,
    shared_weights,
    size_metrics,
    tied_notes,
)
from core.compression.registry import register_step
from core.compression.state import Encoding, ModelState, StepContext, StepReport


@register_step(QuantizeFP8)
def quantize_fp8_step(state: ModelState, config: QuantizeFP8, ctx: StepContext) -> StepReport:
    """Store each selected Linear (and Embedding) weight as float8 e4m3 with a float32 scale, in place.

    e4m3 keeps 3 mantissa bits over a wide exponent range, so it needs no calibration and no grid search; torch
    runs no fp8 matmul on CPU, so the loaded model computes with the decoded float weights.

    Example recipe step: `{"type": "quantize", "method": "fp8", "granularity": "per_channel"}`.
    """
    selected = select_modules(state.model, config.targets, config.exclude, config.include_embeddings)
    weights = shared_weights(state.model, selected)

    def encode(shared: SharedWeight) -> Encoding:
        return quantize_fp8(shared.weight, config.granularity)

    encode_each(state, weights, encode, ctx)
    notes = [f"{len(weights)} weights stored as float8 e4m3 with {config.granularity} float32 scales"]
    metrics = size_metrics(state, weights)
    metrics["bits"] = 8
    return StepReport(metrics=metrics, notes=notes + tied_notes(weights))
