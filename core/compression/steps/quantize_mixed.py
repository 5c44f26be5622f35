"""Mixed-precision round-to-nearest: per-weight code widths chosen from a sensitivity scan under a size budget."""

import torch

from core.compression.configs.quantize import QuantizeMixed
from core.compression.encoding import decode, quantize_rtn
from core.compression.metrics import model_outputs, output_cosine
from core.compression.quant.calibration_tokens import calibration_for
from core.compression.quant.weights import encode_each, quantize_metrics, selected_weights, tied_notes
from core.compression.registry import register_step
from core.compression.select import SharedWeight
from core.compression.state import Encoding, ModelState, StepContext, StepReport
from core.errors import JobCancelled

Sensitivities = dict[str, dict[int, float]]


@register_step(QuantizeMixed)
def quantize_mixed_step(state: ModelState, config: QuantizeMixed, ctx: StepContext) -> StepReport:
    """Give each selected weight one of `bits`, spending `budget.avg_bits` where the model is most sensitive;
    quantizes in place with round-to-nearest at the chosen widths.

    Sensitivity of a weight at a width = 1 - cosine between the model's outputs on the calibration tokens with only
    that weight quantized and the float outputs. The report lists every weight's sensitivities and chosen bits.

    Example recipe step: `{"type": "quantize", "method": "mixed", "bits": [4, 8], "budget": {"avg_bits": 5.0},
    "granularity": "per_group", "group_size": 64}`.
    """
    weights = selected_weights(state.model, config)
    batch = calibration_for(state, config.calibration, ctx)
    sensitivities = _scan(state, weights, config, batch.input_ids, ctx)
    sizes = {shared.name: shared.weight.numel() for shared in weights}
    chosen = choose_bits(sizes, sensitivities, config.bits, config.budget.avg_bits)

    def encode(shared: SharedWeight) -> Encoding:
        return _rtn(shared.weight, chosen[shared.name], config)

    encode_each(state, weights, encode, ctx)
    return _report(state, weights, sensitivities, chosen, batch.notes)


def _rtn(weight: torch.Tensor, bits: int, config: QuantizeMixed) -> Encoding:
    return quantize_rtn(weight, bits, config.granularity, config.symmetric, config.columns_per_scale)


@torch.no_grad()
def _scan(
    state: ModelState, weights: list[SharedWeight], config: QuantizeMixed, input_ids: torch.Tensor, ctx: StepContext
) -> Sensitivities:
    """Quantize one weight at a time at each width and measure how far the outputs move; restores every weight."""
    inputs = {"input_ids": input_ids}
    reference = model_outputs(state.model, inputs)
    sensitivities: Sensitivities = {}
    for index, shared in enumerate(weights):
        if ctx.should_stop():
            raise JobCancelled(f"cancelled during the sensitivity scan, before {shared.name}")
        original = shared.weight.detach().clone()
        sensitivities[shared.name] = {}
        for bits in config.bits:
            shared.weight.copy_(decode(_rtn(original, bits, config)))
            cosine = output_cosine(reference, model_outputs(state.model, inputs))
            sensitivities[shared.name][bits] = max(1.0 - cosine, 0.0)
        shared.weight.copy_(original)
        ctx.report(0.9 * (index + 1) / len(weights), f"sensitivity of {shared.name}")
    return sensitivities


def choose_bits(
    sizes: dict[str, int], sensitivities: Sensitivities, widths: list[int], avg_bits: float
) -> dict[str, int]:
    """Start every weight at the smallest width, then repeatedly take the upgrade (weight, wider width) that
    removes the most sensitivity per extra bit stored, while the mean width stays within `avg_bits`.

    Example: `choose_bits({"a": 10, "b": 10}, {"a": {4: 0.1, 8: 0.0}, "b": {4: 0.01, 8: 0.0}}, [4, 8], 6.0)` is
    `{"a": 8, "b": 4}`.
    """
    chosen = dict.fromkeys(sizes, widths[0])
    spare = (avg_bits - widths[0]) * sum(sizes.values())
    while True:
        upgrades = [
            (_gain_per_bit(sensitivities[name], chosen[name], width, size), name, width)
            for name, size in sizes.items()
            for width in widths
            if width > chosen[name] and (width - chosen[name]) * size <= spare
        ]
        upgrades = [upgrade for upgrade in upgrades if upgrade[0] > 0]
        if not upgrades:
            return chosen
        _, name, width = max(upgrades, key=lambda upgrade: (upgrade[0], upgrade[1]))
        spare -= (width - chosen[name]) * sizes[name]
        chosen[name] = width


def _gain_per_bit(by_width: dict[int, float], current: int, width: int, size: int) -> float:
    return (by_width[current] - by_width[width]) / ((width - current) * size)


def _report(
    state: ModelState,
    weights: list[SharedWeight],
    sensitivities: Sensitivities,
    chosen: dict[str, int],
    calibration_notes: list[str],
) -> StepReport:
    metrics = quantize_metrics(state, weights)
    total = sum(shared.weight.numel() for shared in weights)
    metrics["avg_bits"] = sum(chosen[shared.name] * shared.weight.numel() for shared in weights) / total
    for shared in weights:  # sizes and users beside the scan: a search (core.compression.search) plans from them
        metrics[f"params/{shared.name}"] = shared.weight.numel()
        metrics[f"modules/{shared.name}"] = ",".join(shared.modules)
    for name, by_width in sensitivities.items():
        metrics[f"bits/{name}"] = chosen[name]
        metrics.update({f"sensitivity/{name}/int{bits}": value for bits, value in by_width.items()})
    counts = {bits: sum(1 for value in chosen.values() if value == bits) for bits in sorted(set(chosen.values()))}
    summary = ", ".join(f"{count} at {bits} bits" for bits, count in counts.items())
    notes = [*calibration_notes, f"widths chosen from a one-weight-at-a-time sensitivity scan: {summary}"]
    return StepReport(metrics=metrics, notes=notes + tied_notes(weights))
