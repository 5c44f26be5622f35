"""SmoothQuant W8A8: migrate activation outliers into the weights, then run int8 x int8 Linears."""

import torch
from torch import nn

from core.compression.configs.quantize import QuantizeSmoothQuant
from core.compression.int8.calibrate import calibration_ids, channel_absmax
from core.compression.int8.convert import install_int8, int8_report, linear_bytes, select_linears
from core.compression.int8.smoothing import FoldGroup, fold, llama_fold_groups, smoothing_scale, to_producer
from core.compression.registry import register_step
from core.compression.select import Selection
from core.compression.state import ModelState, StepContext, StepReport
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
    act_absmax = channel_absmax(state.model, names, batch.input_ids, ctx)
    ctx.report(0.3, "activation maxima measured")
    folded = _fold_groups(state.model, selection, act_absmax, config.alpha)
    factors = _runtime_factors(selection, act_absmax, folded, config) if config.runtime_smoothing else {}
    if config.activations == "static":
        install_static(state, selection, config, batch.input_ids, factors, ctx)
    else:
        for name, linear in selection.modules.items():
            install_int8(state, name, linear, config, input_factor=factors.get(name))
    report = int8_report(state, selection, original_bytes)
    report.metrics.update({"linears_folded": len(folded), "linears_runtime_smoothed": len(factors)})
    report.notes[:0] = [_summary(selection, folded, factors, config), *batch.notes]
    return report


def _fold_groups(model: nn.Module, selection: Selection[nn.Linear], act_absmax: dict[str, torch.Tensor],
                 alpha: float) -> set[str]:
    """Fold smoothing into every Llama-style group whose consumers are all selected; the consumers' names."""
    selected = set(selection.modules)
    groups = [group for group in llama_fold_groups(model) if set(group.consumers) <= selected]
    scales = [_group_scale(model, group, act_absmax, alpha) for group in groups]  # all from the original weights
    for group, scale in zip(groups, scales, strict=True):
        fold(model, group, scale)
    return {name for group in groups for name in group.consumers}


def _group_scale(model: nn.Module, group: FoldGroup, act_absmax: dict[str, torch.Tensor],
                 alpha: float) -> torch.Tensor:
    activations = to_producer(act_absmax[group.consumers[0]], group)
    weights = [to_producer(model.get_submodule(name).weight.abs().amax(dim=0), group) for name in group.consumers]
    return smoothing_scale(activations, [w[None, :] for w in weights], alpha)


@torch.no_grad()
def _runtime_factors(selection: Selection[nn.Linear], act_absmax: dict[str, torch.Tensor], folded: set[str],
                     config: QuantizeSmoothQuant) -> dict[str, torch.Tensor]:
    """Smooth the Linears that could not be folded: scale their weight columns by s now, and return 1/s as the
    input factor their int8 module applies at run time."""
    factors = {}
    for name, linear in selection.modules.items():
        if name in folded:
            continue
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
