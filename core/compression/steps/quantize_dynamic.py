"""Dynamic W8A8 quantization: int8 Linear modules whose activations are quantized per input at run time."""

from core.compression.configs.quantize import QuantizeDynamic
from core.compression.int8.convert import each_linear, install_int8, int8_report, linear_bytes, select_linears
from core.compression.int8.cpu import cpu_has_vnni
from core.compression.registry import register_step
from core.compression.state import ModelState, StepContext, StepReport
from core.errors import JobCancelled


@register_step(QuantizeDynamic)
def quantize_dynamic_step(state: ModelState, config: QuantizeDynamic, ctx: StepContext) -> StepReport:
    """Replace each selected `nn.Linear` by a `DynamicInt8Linear`, in place: symmetric int8 weights (per channel or
    per tensor) and uint8 activations quantized from each input's own range, multiplied by fbgemm's int8 GEMM.

    The in-memory model runs the same int8 kernels as the artifact `load_compressed` rebuilds, so the pipeline's
    metrics are the artifact's. Example recipe step: `{"type": "quantize", "method": "dynamic"}`.
    """
    selection = select_linears(state.model, config)
    original_bytes = linear_bytes(selection)
    for index, (name, linear) in enumerate(each_linear(state, selection.modules)):
        if ctx.should_stop():
            raise JobCancelled(f"cancelled while quantizing, before {name}")
        install_int8(state, name, linear, config)
        ctx.report((index + 1) / len(selection.modules), f"int8 dynamic: {name}")
    report = int8_report(state, selection, original_bytes)
    activation_bits = 7 if config.reduce_range or not cpu_has_vnni() else 8
    report.notes.insert(0, f"{len(selection.modules)} Linear modules run int8 weights x {activation_bits}-bit "
                           f"dynamic activations ({config.granularity} weight scales)")
    return report
