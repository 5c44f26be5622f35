"""Round-to-nearest weight-only quantization (the family's default method)."""

from torch import nn

from core.compression.encoding import quantize_rtn_
from core.compression.quant.weights import quantize_selected
from core.compression.registry import register_step
from core.compression.spec import QuantizeRTN
from core.compression.state import Encoding, ModelState, StepContext, StepReport


@register_step(QuantizeRTN)
def quantize_rtn_step(state: ModelState, config: QuantizeRTN, ctx: StepContext) -> StepReport:
    """Round-to-nearest quantization of the selected `nn.Linear` (and `nn.Embedding`) weights, in place.

    Each selected weight is overwritten with its decoded value, so later steps and metrics see exactly what the
    saved artifact computes; the packed encoding goes to `state.encodings["<module>.weight"]`. A weight shared by
    several modules (tied input/output embeddings) is quantized and stored once, under its first module's name.

    Example recipe steps: `{"type": "quantize", "granularity": "per_channel", "exclude": ["*.down_proj"]}`,
    `{"type": "quantize", "bits": 4, "granularity": "per_group", "group_size": 128, "symmetric": false}`.
    """
    kind = "symmetric" if config.symmetric else "asymmetric"
    group = f" (groups of {config.group_size} columns)" if config.columns_per_scale else ""

    def encode(weight: nn.Parameter) -> Encoding:
        return quantize_rtn_(weight, config.bits, config.granularity, config.symmetric, config.columns_per_scale)

    describe = f"stored as int{config.bits} codes, {config.granularity}{group} {kind} scales"
    return quantize_selected(state, config, ctx, encode, config.bits, describe, in_place=True)
