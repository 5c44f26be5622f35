"""Post-training static W8A8 quantization: activation ranges calibrated once by an observer."""

import torch
from torch import nn

from core.compression.configs.quantize import QuantizeStatic, _CalibratedInt8Fields
from core.compression.int8.calibrate import calibration_ids, range_stats
from core.compression.int8.convert import each_linear, install_int8, int8_report, linear_bytes, select_linears
from core.compression.int8.observers import choose_range, qparams
from core.compression.registry import register_step
from core.compression.select import Selection
from core.compression.state import ModelState, StepContext, StepReport, whole_model_passes


@register_step(QuantizeStatic)
def quantize_static_step(state: ModelState, config: QuantizeStatic, ctx: StepContext) -> StepReport:
    """Replace each selected `nn.Linear` by a `StaticInt8Linear`, in place: symmetric int8 weights and uint8
    activations with one per-tensor scale and zero point per Linear, chosen by `config.observer` from the inputs
    the Linear saw on calibration text (one pass for the exact range, a second for the histogram).

    Example recipe step: `{"type": "quantize", "method": "static", "observer": "mse"}`.
    """
    selection = select_linears(state.model, config)
    original_bytes = linear_bytes(selection)
    batch = calibration_ids(state, config.calibration, ctx)
    ctx.report(0.0, "calibrating activation ranges")
    install_static(state, selection, config, batch.input_ids, {}, ctx)
    report = int8_report(state, selection, original_bytes)
    bits = "7-bit activation ranges" if config.static_reduce_range() else "8-bit activation ranges"
    report.notes[:0] = [f"{len(selection.modules)} Linear modules run int8 weights x static int8 activations "
                        f"({config.observer} observer, {bits})", *batch.notes]
    return report


def install_static(state: ModelState, selection: Selection[nn.Linear], config: _CalibratedInt8Fields,
                   input_ids: torch.Tensor, factors: dict[str, torch.Tensor], ctx: StepContext) -> None:
    """Calibrate every selected Linear's input range on the float model, then convert them all to static int8.
    `factors` are runtime input factors (SmoothQuant) of some Linears, applied before observing."""
    bins = None if config.observer == "minmax" else config.bins
    names = {name: factors.get(name) for name in selection.modules}
    with whole_model_passes(state):
        stats = range_stats(state.model, names, input_ids, bins, ctx)
    for name, linear in each_linear(state, selection.modules):
        low, high = choose_range(stats[name], config.observer, config.percentile)
        input_qparams = qparams(low, high, config.static_reduce_range())
        install_int8(state, name, linear, config, input_qparams=input_qparams, input_factor=factors.get(name))
    ctx.report(1.0, "static int8 modules installed")
