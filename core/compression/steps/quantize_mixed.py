"""Mixed-precision round-to-nearest: per-weight code widths chosen from a sensitivity scan under a size budget."""

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from core.compression.configs.quantize import QuantizeMixed
from core.compression.encoding import decode, quantize_rtn
from core.compression.metrics import model_outputs, output_cosine
from core.compression.quant.calibration_tokens import calibration_for
from core.compression.quant.layerwise import BlockCall, first_block_calls, transformer_blocks
from core.compression.quant.weights import encode_each, quantize_metrics, selected_weights, tied_notes
from core.compression.registry import register_step
from core.compression.select import SharedWeight
from core.compression.state import (
    Encoding,
    ModelState,
    StepContext,
    StepReport,
    discard_block,
    each_in_memory,
    load_block,
    whole_model_passes,
)
from core.errors import JobCancelled

Sensitivities = dict[str, dict[int, float]]
BATCH_SIZE = 8  # calibration rows per block call: bounds activation memory, not the result


@register_step(QuantizeMixed)
def quantize_mixed_step(state: ModelState, config: QuantizeMixed, ctx: StepContext) -> StepReport:
    """Give each selected weight one of `bits`, spending `budget.avg_bits` where the model is most sensitive;
    quantizes in place with round-to-nearest at the chosen widths.

    Sensitivity of a weight at a width estimates 1 - cosine between the model's outputs on the calibration tokens
    with only that weight quantized and the float outputs. Weights outside the transformer blocks (embeddings, the
    head) are measured so, one whole forward each. A weight inside block i is measured on that block alone: the
    block's relative squared error (‖output - float output‖² / ‖float output‖², on the block's float inputs),
    times block i's scale, the whole model's 1 - output cosine over the block's relative error with all of its
    selected weights at the narrowest width. Numbers of all blocks and the outside weights are thus on one scale,
    and the scan costs one forward per block instead of one per weight and width (SmolLM2-135M at 4 widths: 36
    forwards and 840 single-block runs instead of 845 forwards). The report lists every weight's sensitivities and
    chosen bits.

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
    """Each weight's sensitivity at each width (see the handler's docstring); restores every weight. Weights inside
    the transformer blocks are measured on their block alone, the others (embeddings, the head) on the whole model."""
    with whole_model_passes(state):
        reference = model_outputs(state.model, {"input_ids": input_ids})
    progress = _Progress(ctx, len(weights))
    found = transformer_blocks(state.model)
    by_block = _weights_by_block(weights, found[1] if found else None, found[0] if found else "")
    inside = {shared.name for group in by_block.values() for shared in group}
    outside = [shared for shared in weights if shared.name not in inside]
    sensitivities = whole_model_sensitivities(state, outside, config, input_ids, reference, progress)
    if found is not None and by_block:
        sensitivities |= _block_sensitivities(state, found, by_block, config, input_ids, reference, progress)
    return {shared.name: sensitivities[shared.name] for shared in weights}


@dataclass
class _Progress:
    """Polls for cancellation before each weight and reports after it (the scan is 90% of the step)."""

    ctx: StepContext
    total: int
    done: int = 0

    def before(self, name: str) -> None:
        if self.ctx.should_stop():
            raise JobCancelled(f"cancelled during the sensitivity scan, before {name}")

    def after(self, name: str) -> None:
        self.done += 1
        self.ctx.report(0.9 * self.done / self.total, f"sensitivity of {name}")


@torch.no_grad()
def whole_model_sensitivities(
    state: ModelState,
    weights: list[SharedWeight],
    config: QuantizeMixed,
    input_ids: torch.Tensor,
    reference: torch.Tensor,
    progress: _Progress,
) -> Sensitivities:
    """1 - output cosine of the whole model with one weight at a time quantized at each width: one forward per
    weight and width (the scan before it went block-local; still used outside the blocks)."""
    in_memory = each_in_memory(state, weights, lambda shared: shared.name, keep=False)  # each weight is restored
    return _each_weight_and_width(in_memory, config, progress, lambda: _damage(state, input_ids, reference))


def _damage(state: ModelState, input_ids: torch.Tensor, reference: torch.Tensor) -> float:
    with whole_model_passes(state):  # an offloaded model's other blocks are read as the pass reaches them
        cosine = output_cosine(reference, model_outputs(state.model, {"input_ids": input_ids}))
    return max(1.0 - cosine, 0.0)


def _weights_by_block(
    weights: list[SharedWeight], blocks: nn.ModuleList | None, prefix: str
) -> dict[int, list[SharedWeight]]:
    """The weights each block uses alone, by block index; a weight used outside the blocks or by several (tied
    across layers) belongs to none."""
    if blocks is None:
        return {}
    by_block: dict[int, list[SharedWeight]] = {}
    for shared in weights:
        indices = {_block_index(module, prefix, len(blocks)) for module in shared.modules}
        if len(indices) == 1 and (index := indices.pop()) is not None:
            by_block.setdefault(index, []).append(shared)
    return by_block


def _block_index(module: str, prefix: str, count: int) -> int | None:
    """The index of the block under `prefix` that holds `module` (`model.layers.3.mlp.up_proj` -> 3), or None."""
    if not module.startswith(prefix + "."):
        return None
    index = module.removeprefix(prefix + ".").split(".", 1)[0]
    return int(index) if index.isdigit() and int(index) < count else None


@torch.no_grad()
def _block_sensitivities(
    state: ModelState,
    found: tuple[str, nn.ModuleList],
    by_block: dict[int, list[SharedWeight]],
    config: QuantizeMixed,
    input_ids: torch.Tensor,
    reference: torch.Tensor,
    progress: _Progress,
) -> Sensitivities:
    """Run the float model once up to the first block (the block runner GPTQ uses), then each block on its
    float inputs: its float outputs once, then each of its weights quantized alone at each width, block only.
    Every weight is restored, so an offloaded block is let go unchanged."""
    prefix, blocks = found
    calls = first_block_calls(state.model, blocks[0], input_ids, BATCH_SIZE)
    sensitivities: Sensitivities = {}
    for index, block in enumerate(blocks[: max(by_block) + 1]):
        load_block(state, f"{prefix}.{index}", block)
        targets = [call.run(block) for call in calls]
        if index in by_block:
            local = _local_errors(block, by_block[index], config, calls, targets, progress)
            scale = _block_scale(state, block, by_block[index], config, (calls, targets), (input_ids, reference))
            sensitivities |= {name: {bits: scale * error for bits, error in by_width.items()}
                              for name, by_width in local.items()}
        calls = [call.with_hidden(target) for call, target in zip(calls, targets, strict=True)]
        discard_block(state, f"{prefix}.{index}", block)
    return sensitivities


def _local_errors(
    block: nn.Module,
    weights: list[SharedWeight],
    config: QuantizeMixed,
    calls: list[BlockCall],
    targets: list[torch.Tensor],
    progress: _Progress,
) -> Sensitivities:
    """Each weight's block-local error at each width: the block rerun on its cached inputs with that weight alone
    quantized."""
    return _each_weight_and_width(weights, config, progress, lambda: _relative_error(block, calls, targets))


def _each_weight_and_width(weights: Iterable[SharedWeight], config: QuantizeMixed, progress: _Progress,
                           measure: Callable[[], float]) -> Sensitivities:
    """`measure()` with each weight alone quantized at each width; every weight is restored after its turn."""
    measured: Sensitivities = {}
    for shared in weights:
        progress.before(shared.name)
        original = shared.weight.detach().clone()
        measured[shared.name] = {}
        for bits in config.bits:
            shared.weight.copy_(decode(_rtn(original, bits, config)))
            measured[shared.name][bits] = measure()
        shared.weight.copy_(original)
        progress.after(shared.name)
    return measured


def _relative_error(block: nn.Module, calls: list[BlockCall], targets: list[torch.Tensor]) -> float:
    """‖block output - float block output‖² / ‖float block output‖², over every calibration token."""
    moved = sum(float((call.run(block) - target).float().square().sum()) for call, target in zip(calls, targets,
                                                                                                   strict=True))
    size = sum(float(target.float().square().sum()) for target in targets)
    return moved / size if size > 0 else 0.0


def _block_scale(
    state: ModelState,
    block: nn.Module,
    weights: list[SharedWeight],
    config: QuantizeMixed,
    block_run: tuple[list[BlockCall], list[torch.Tensor]],
    model_run: tuple[torch.Tensor, torch.Tensor],
) -> float:
    """What one unit of this block's local error costs the model's outputs: with all of `weights` at the
    narrowest width, the whole model's 1 - output cosine over the block's relative error (one forward). It puts
    every block's (and the outside weights') numbers on the one scale that `choose_bits` and a search compare."""
    originals = [shared.weight.detach().clone() for shared in weights]
    for shared, original in zip(weights, originals, strict=True):
        shared.weight.copy_(decode(_rtn(original, config.bits[0], config)))
    local = _relative_error(block, *block_run)
    whole = _damage(state, *model_run)
    for shared, original in zip(weights, originals, strict=True):
        shared.weight.copy_(original)
    return whole / local if local > 0 else 0.0


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
    scan = "a one-weight-at-a-time sensitivity scan (block-local inside the blocks)"
    notes = [*calibration_notes, f"widths chosen from {scan}: {summary}"]
    return StepReport(metrics=metrics, notes=notes + tied_notes(weights))
