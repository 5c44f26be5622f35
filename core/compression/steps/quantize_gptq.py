"""GPTQ: Hessian-aware, error-compensating weight quantization on calibration data, one block at a time."""

from dataclasses import dataclass, field

import torch
from torch import nn

from core.compression.configs.quantize import QuantizeGPTQ
from core.compression.corpus import CalibrationBatch
from core.compression.encoding import decode, packed_int_encoding, quantize_packed_int
from core.compression.quant.calibration_tokens import calibration_for
from core.compression.quant.gptq import gptq_quantize, output_error
from core.compression.quant.grid import GridParams, IntGrid, dequantize_codes
from core.compression.quant.layerwise import BlockCall, first_block_calls, input_hessians, transformer_blocks
from core.compression.quant.scale_tuning import tune_scales
from core.compression.quant.weights import quantize_metrics, selected_weights, store_decoded
from core.compression.registry import register_step
from core.compression.select import SharedWeight
from core.compression.sparsity.masks import keep_sparse
from core.compression.sparsity.reconstruct import ReconstructionResult, reconstruction_metrics
from core.compression.state import ModelState, StepContext, StepReport, each_in_memory, load_block, release_block
from core.errors import JobCancelled

BATCH_SIZE = 8  # calibration rows per forward: bounds activation memory, not the result


@register_step(QuantizeGPTQ)
def quantize_gptq_step(state: ModelState, config: QuantizeGPTQ, ctx: StepContext) -> StepReport:
    """GPTQ-quantize the selected Linear weights inside the model's transformer blocks, in place; selected
    weights outside the blocks (embeddings, lm_head, pooler) get round-to-nearest on the same grid.

    Blocks run in order on the calibration tokens, each on the outputs of the already quantized blocks before it,
    so every layer compensates for the error upstream of it. Weights are overwritten with their decoded values.

    Example recipe step: `{"type": "quantize", "method": "gptq", "bits": 4, "granularity": "per_group",
    "group_size": 128, "calibration": {"dataset_id": null, "num_samples": 32, "seq_len": 512}}`.
    """
    grid = IntGrid(config.bits, config.symmetric, config.granularity, config.columns_per_scale, config.full_range)
    weights = selected_weights(state.model, config)
    batch = calibration_for(state, config.calibration, ctx)
    stats = _Stats()
    in_blocks = _gptq_blocks(state, config, grid, weights, batch.input_ids, ctx, stats)
    outside = [shared for shared in weights if shared.name not in in_blocks]
    for shared in each_in_memory(state, outside, lambda shared: shared.name):
        encoding = keep_sparse(state, shared.name, quantize_packed_int(shared.weight, grid))
        state.encodings[shared.name] = store_decoded(shared.weight, encoding)
    return _report(state, weights, config, batch, in_blocks, stats)


@dataclass
class _Stats:
    """The GPTQ objective ‖(W - Q)X‖² summed over layers, for GPTQ and for round-to-nearest on the same grid; the
    block errors of the scale tuning (`reconstruct`)."""

    gptq_error: float = 0.0
    rtn_error: float = 0.0
    tuned: list[ReconstructionResult] = field(default_factory=list)


def _gptq_blocks(
    state: ModelState,
    config: QuantizeGPTQ,
    grid: IntGrid,
    weights: list[SharedWeight],
    input_ids: torch.Tensor,
    ctx: StepContext,
    stats: _Stats,
) -> set[str]:
    """Quantize the selected Linear weights of each block in turn; returns the names of the weights done."""
    found = transformer_blocks(state.model)
    if found is None:
        return set()
    prefix, blocks = found
    by_weight = {id(shared.weight): shared for shared in weights}
    calls = first_block_calls(state.model, blocks[0], input_ids, BATCH_SIZE)
    # With `reconstruct`, the uncompressed model's own stream runs beside the quantized one: its block outputs are
    # what the scale tuning aims at.
    dense = calls if config.reconstruct is not None else None
    done: set[str] = set()
    for index, block in enumerate(blocks):
        if ctx.should_stop():
            raise JobCancelled(f"cancelled while quantizing, before block {index}")
        name = f"{prefix}.{index}"
        load_block(state, name, block)
        linears = _block_linears(block, name, by_weight)
        targets = _outputs(block, dense) if dense is not None else None
        quantized = _quantize_block(config, grid, linears, block, calls, stats)
        if targets is not None:
            quantized = _tuned(config, grid, name, block, quantized, calls, targets, stats)
        _store(state, grid, quantized)
        done |= set(linears)
        calls = _next_calls(block, calls)
        if dense is not None and targets is not None:
            dense = [call.with_hidden(target) for call, target in zip(dense, targets, strict=True)]
        release_block(state, name, block)
        ctx.report((index + 1) / len(blocks), f"quantized block {index + 1} of {len(blocks)}")
    return done


def _block_linears(block: nn.Module, prefix: str, by_weight: dict[int, SharedWeight]) -> dict[str, nn.Linear]:
    """The selected Linear modules of one block, keyed by their weight's name in the model."""
    linears = {}
    for module in block.modules():
        shared = by_weight.get(id(getattr(module, "weight", None)))
        if isinstance(module, nn.Linear) and shared is not None and shared.name.startswith(prefix + "."):
            linears[shared.name] = module
    return linears


Quantized = dict[str, tuple[nn.Linear, torch.Tensor, GridParams]]  # weight name -> module, codes, grid params


@torch.no_grad()
def _quantize_block(
    config: QuantizeGPTQ,
    grid: IntGrid,
    linears: dict[str, nn.Linear],
    block: nn.Module,
    calls: list[BlockCall],
    stats: _Stats,
) -> Quantized:
    """GPTQ's codes and params for each of the block's `linears`; the float weights are left as they are (the
    later layers' Hessians come from the same float block, as in GPTQ)."""
    with input_hessians(linears) as hessians:
        for call in calls:
            call.run(block)
    quantized: Quantized = {}
    for name, module in linears.items():
        weight, hessian = module.weight, hessians.pop(name)
        codes, params = gptq_quantize(
            weight, hessian, grid, config.dampening, config.block_columns, config.act_order, config.clip_search,
            config.refit_rounds,
        )
        stats.gptq_error += output_error(weight, dequantize_codes(codes, params, grid), hessian)
        stats.rtn_error += output_error(weight, decode(quantize_packed_int(weight, grid)), hessian)
        quantized[name] = (module, codes, params)
    return quantized


def _tuned(
    config: QuantizeGPTQ,
    grid: IntGrid,
    name: str,
    block: nn.Module,
    quantized: Quantized,
    calls: list[BlockCall],
    targets: list[torch.Tensor],
    stats: _Stats,
) -> Quantized:
    """`quantized` with its scales tuned so that the block's outputs on `calls` match `targets` (as it is without
    `reconstruct` or without quantized layers)."""
    if config.reconstruct is None or not quantized:
        return quantized
    params, result = tune_scales(name, block, quantized, grid, calls, targets, config.reconstruct,
                                 config.calibration.seed)
    stats.tuned.append(result)
    return {weight: (module, codes, params[weight]) for weight, (module, codes, _) in quantized.items()}


@torch.no_grad()
def _store(state: ModelState, grid: IntGrid, quantized: Quantized) -> None:
    """Record each weight's encoding and overwrite the weight with what it decodes to."""
    for name, (module, codes, params) in quantized.items():
        encoding = keep_sparse(state, name, packed_int_encoding(codes, params, grid))
        state.encodings[name] = store_decoded(module.weight, encoding)


@torch.no_grad()
def _outputs(block: nn.Module, calls: list[BlockCall]) -> list[torch.Tensor]:
    return [call.run(block) for call in calls]


@torch.no_grad()
def _next_calls(block: nn.Module, calls: list[BlockCall]) -> list[BlockCall]:
    """The next block's inputs: this block's outputs, computed with its weights already quantized."""
    return [call.with_hidden(call.run(block)) for call in calls]


def _report(
    state: ModelState,
    weights: list[SharedWeight],
    config: QuantizeGPTQ,
    batch: CalibrationBatch,
    in_blocks: set[str],
    stats: _Stats,
) -> StepReport:
    metrics = quantize_metrics(state, weights)
    outside = [shared.name for shared in weights if shared.name not in in_blocks]
    metrics.update(
        bits=config.bits,
        gptq_tensors=len(in_blocks),
        rtn_tensors=len(outside),
        calibration_tokens=batch.input_ids.numel(),
        gptq_vs_rtn_output_error=stats.gptq_error / stats.rtn_error if stats.rtn_error else 1.0,
    )
    if stats.tuned:
        metrics.update(reconstruction_metrics(stats.tuned))
    notes = [*batch.notes, f"{len(in_blocks)} Linear weights inside transformer blocks quantized with GPTQ"]
    if outside:
        notes.append(f"{len(outside)} weights outside the blocks use round-to-nearest: {', '.join(outside[:8])}")
    return StepReport(metrics=metrics, notes=notes)
