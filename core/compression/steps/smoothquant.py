"""SmoothQuant W8A8: migrate activation outliers into the weights, then run int8 x int8 Linears."""

from itertools import groupby

import torch
from torch import nn

from core.compression.configs.quantize import QuantizeSmoothQuant
from core.compression.int8.calibrate import calibration_ids, channel_absmax
from core.compression.int8.convert import each_linear, install_int8, int8_report, linear_bytes, select_linears
from core.compression.int8.smoothing import FoldGroup, fold, llama_fold_groups, smoothing_scale, to_producer
from core.compression.registry import register_step
from core.compression.select import Selection
from core.compression.state import ModelState, StepContext, StepReport, each_in_memory, whole_model_passes
from core.compression.steps.quantize_static import install_static


@register_step(QuantizeSmoothQuant)
def smoothquant_step(state: ModelState, config: QuantizeSmoothQuant, ctx: StepContext) -> StepReport:
    """SmoothQuant, in place: measure max|X| per input channel of each selected Linear on calibration text, move
    `alpha` of the outliers into the weights (folded into the preceding norm or Linear where possible, else as a
    runtime input factor), then convert every selected Linear to int8 (dynamic or static activations).

    Example recipe step: `{"type": "quantize", "method": "smoothquant", "alpha": 0.5}`.
    """
    selection = select_linears(state.model, config)
    original_bytes = linear_bytes(selection)
    batch = calibration_ids(state, config.calibration, ctx)
    names = list(selection.modules)
    with whole_model_passes(state):
        act_absmax = channel_absmax(state.model, names, batch.input_ids, ctx)
    ctx.report(0.3, "activation maxima measured")
    folded = _fold_groups(state, selection, act_absmax, config.alpha)
    factors = _runtime_factors(state, selection, act_absmax, folded, config) if config.runtime_smoothing else {}
    if config.activations == "static":
        install_static(state, selection, config, batch.input_ids, factors, ctx)
    else:
        for name, linear in each_linear(state, selection.modules):
            install_int8(state, name, linear, config, input_factor=factors.get(name))
    report = int8_report(state, selection, original_bytes)
    report.metrics.update({"linears_folded": len(folded), "linears_runtime_smoothed": len(factors)})
    report.notes[:0] = [_summary(selection, folded, factors, config), *batch.notes]
    return report


def _fold_groups(state: ModelState, selection: Selection[nn.Linear], act_absmax: dict[str, torch.Tensor],
                 alpha: float) -> set[str]:
    """Fold smoothing into every Llama-style group whose consumers are all selected, a decoder layer at a time;
    the consumers' names."""
    selected = set(selection.modules)
    groups = [group for group in llama_fold_groups(state.model) if set(group.consumers) <= selected]
    layers = [list(in_layer) for _, in_layer in groupby(groups, key=lambda group: group.layer)]
    for in_layer in each_in_memory(state, layers, lambda in_layer: in_layer[0].consumers[0]):
        # all of a layer's scales from its original weights: v_proj is a consumer of one group, producer of another
        scales = [_group_scale(state.model, group, act_absmax, alpha) for group in in_layer]
        for group, scale in zip(in_layer, scales, strict=True):
            fold(state.model, group, scale)
    return {name for group in groups for name in group.consumers}


def _group_scale(model: nn.Module, group: FoldGroup, act_absmax: dict[str, torch.Tensor],
                 alpha: float) -> torch.Tensor:
    activations = to_producer(act_absmax[group.consumers[0]], group)
    weights = [to_producer(model.get_submodule(name).weight.abs().amax(dim=0), group) for name in group.consumers]
    return smoothing_scale(activations, [w[None, :] for w in weights], alpha)


@torch.no_grad()
def _runtime_factors(state: ModelState, selection: Selection[nn.Linear], act_absmax: dict[str, torch.Tensor],
                     folded: set[str], config: QuantizeSmoothQuant) -> dict[str, torch.Tensor]:
    """Smooth the Linears that could not be folded: scale their weight columns by s now, and return 1/s as the
    input factor their int8 module applies at run time."""
    factors = {}
    unfolded = {name: linear for name, linear in selection.modules.items() if name not in folded}
    for name, linear in each_linear(state, unfolded):
        scale = smoothing_scale(act_absmax[name], [linear.weight], config.alpha)
        linear.weight.mul_(scale)
        factors[name] = 1.0 / scale
    return factors


def _summary(selection: Selection[nn.Linear], folded: set[str], factors: dict[str, torch.Tensor],
             config: QuantizeSmoothQuant) -> str:
    plain = len(selection.modules) - len(folded) - len(factors)
    return (f"SmoothQuant alpha={config.alpha}: {len(folded)} Linears smoothed by folding into the preceding layer, "
            f"{len(factors)} at run time, {plain} not smoothed; all {len(selection.modules)} run int8 weights x "
            f"{config.activations} int8 activations")
