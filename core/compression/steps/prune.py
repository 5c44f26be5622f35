"""Pruning steps: magnitude, Wanda, SparseGPT (stored sparse) and structured pruning (modules physically shrunk)."""

from collections.abc import Callable

import torch
from torch import nn

from core.compression.configs.prune import PruneMagnitude, PruneSparseGPT, PruneStructured, PruneWanda
from core.compression.registry import register_step
from core.compression.select import Tied, refuse_encoded, select_modules
from core.compression.sparsity import unstructured
from core.compression.sparsity.blockwise import (
    InputStats,
    block_statistics,
    calibration_batches,
)
from core.compression.sparsity.masks import dense_float, sparse_encoding
from core.compression.sparsity.reconstruct import ReconstructionResult, reconstruct_block, reconstruction_metrics
from core.compression.sparsity.structured import prune_structured
from core.compression.state import ModelState, StepContext, StepReport, each_in_memory, size_metrics
from core.errors import JobCancelled

LayerPruner = Callable[[nn.Linear, InputStats], torch.Tensor]
SPEED_NOTE = ("unstructured sparsity gives no speedup with dense kernels (and load_compressed restores dense "
              "weights): the saving is file size only")


@register_step(PruneMagnitude)
def prune_magnitude_step(state: ModelState, config: PruneMagnitude, ctx: StepContext) -> StepReport:
    """Magnitude pruning of the selected Linear/Conv2d (and, if asked, Embedding) weights, in place.

    The pruned weight keeps its shape (zeros in place) and is stored as a `sparse_bitmask` encoding.
    Example recipe step: `{"type": "prune", "method": "magnitude", "sparsity": 0.5, "scope": "global"}`.
    """
    kinds = (nn.Linear, nn.Conv2d, nn.Embedding) if config.include_embeddings else (nn.Linear, nn.Conv2d)
    # An embedding table is pruned together with the LM head tied to it; without embeddings that head is skipped.
    weights = _weights(state, config, kinds, tied="shared" if config.include_embeddings else "skipped")
    nm, threshold = config.nm(), None
    if nm is None and config.scope == "global":  # a first pass over every weight, one block in memory at a time
        threshold = unstructured.global_threshold(
            lambda: (weights[name].detach().abs() for name in each_in_memory(state, weights, keep=False)),
            config.sparsity)
    zeros: dict[str, int] = {}
    for index, name in enumerate(each_in_memory(state, weights)):
        if ctx.should_stop():
            raise JobCancelled(f"cancelled while pruning, before {name}")
        magnitude = weights[name].detach().abs()
        if nm is not None:
            mask = unstructured.nm_mask(magnitude, nm)
        elif threshold is not None:
            mask = magnitude > threshold
        else:
            mask = unstructured.smallest_mask(magnitude, config.sparsity)
        zeros[name] = _store_pruned(state, name, weights[name], mask)
        ctx.report((index + 1) / len(weights), f"pruned {name}")
    return sparsity_report(state, weights, zeros, config.pattern, [])


@register_step(PruneWanda)
def prune_wanda_step(state: ModelState, config: PruneWanda, ctx: StepContext) -> StepReport:
    """Wanda pruning of the selected Linear layers, block by block on calibration activations, in place.

    Example recipe step: `{"type": "prune", "method": "wanda", "pattern": "2:4"}`.
    """
    nm = config.nm()

    def prune(layer: nn.Linear, stats: InputStats) -> torch.Tensor:
        scores = unstructured.wanda_scores(layer.weight.detach(), stats.sq_sum)
        return unstructured.nm_mask(scores, nm) if nm else unstructured.rowwise_mask(scores, config.sparsity)

    return _calibrated(state, config, ctx, prune, {"sq"})


@register_step(PruneSparseGPT)
def prune_sparsegpt_step(state: ModelState, config: PruneSparseGPT, ctx: StepContext) -> StepReport:
    """SparseGPT pruning of the selected Linear layers, block by block on calibration activations, in place:
    the kept weights are updated to compensate for the pruned ones.

    Example recipe step: `{"type": "prune", "method": "sparsegpt", "sparsity": 0.5}`.
    """
    nm = config.nm()
    # An N:M group must not straddle two solver blocks.
    block_size = config.block_size if nm is None else max(nm[1], config.block_size - config.block_size % nm[1])

    def prune(layer: nn.Linear, stats: InputStats) -> torch.Tensor:
        weight, mask = unstructured.sparsegpt(layer.weight.detach(), stats.gram, config.sparsity, nm, block_size,
                                              config.dampening)
        layer.weight.data.copy_(weight)
        return mask

    return _calibrated(state, config, ctx, prune, {"gram"})


@register_step(PruneStructured)
def prune_structured_step(state: ModelState, config: PruneStructured, ctx: StepContext) -> StepReport:
    """Structured pruning: removes heads, FFN neurons, conv channels or blocks, shrinking the modules in place.

    Each change is a recorded rewrite, so `load_compressed` rebuilds the same smaller shapes before loading.
    Example recipe step: `{"type": "prune", "method": "structured", "target": "heads", "amount": 0.25}`.
    """
    return prune_structured(state, config, ctx)


def _weights(state: ModelState, config: PruneMagnitude | PruneWanda | PruneSparseGPT,
             kinds: tuple[type[nn.Module], ...], tied: Tied) -> dict[str, nn.Parameter]:
    """The selected weights by parameter name; a tied weight once, under its first module's name."""
    selection = select_modules(state.model, config, kinds, tied=tied)
    weights = {shared.name: shared.weight for shared in selection.shared_weights()}
    refuse_encoded(state, list(weights), "prune")
    return weights


@torch.no_grad()
def _store_pruned(state: ModelState, name: str, weight: nn.Parameter, mask: torch.Tensor) -> int:
    """Prune `weight` in place, record its encoding, and return its zeros (counted now: with the blocks offloaded
    the weight is no longer in memory when the report is made)."""
    weight.mul_(mask)
    state.encodings[name] = sparse_encoding(mask, dense_float(weight))
    return int((weight == 0).sum())


def _calibrated(state: ModelState, config: PruneWanda | PruneSparseGPT, ctx: StepContext, prune: LayerPruner,
                want: set[str]) -> StepReport:
    weights = _weights(state, config, (nn.Linear,), tied="skipped")
    layers = {name.removesuffix(".weight"): state.model.get_submodule(name.removesuffix(".weight")) for name in weights}
    data = calibration_batches(state, config, ctx)
    done: set[str] = set()
    zeros: dict[str, int] = {}
    rebuilt: list[ReconstructionResult] = []
    blocks = block_statistics(state, layers, data.batches, want, ctx, "pruning",
                              with_targets=config.reconstruct is not None)
    for run, mine, stats in blocks:
        # popped: each layer's statistics are freed once used, before the next (larger) layer is solved
        masks = {name: prune(layer, stats.pop(name)) for name, layer in mine.items()}
        if config.reconstruct is not None and run.targets is not None and mine:
            _apply_masks(mine, masks)
            rebuilt.append(reconstruct_block(run, {mine[name].weight: mask for name, mask in masks.items()},
                                             config.reconstruct, config.calibration.seed))
        for name, layer in mine.items():
            zeros[f"{name}.weight"] = _store_pruned(state, f"{name}.weight", layer.weight, masks[name])
        done |= set(mine)
        ctx.report(len(done) / len(layers), f"pruned {run.name or 'the model'}")
    skipped = sorted(set(layers) - done)
    notes = data.notes + ([f"left dense (outside the repeated blocks): {', '.join(skipped)}"] if skipped else [])
    pruned = {name: weight for name, weight in weights.items() if name.removesuffix(".weight") in done}
    report = sparsity_report(state, pruned, zeros, config.pattern, notes)
    if rebuilt:
        report.metrics.update(reconstruction_metrics(rebuilt))
    return report


@torch.no_grad()
def _apply_masks(layers: dict[str, nn.Linear], masks: dict[str, torch.Tensor]) -> None:
    for name, layer in layers.items():
        layer.weight.mul_(masks[name])


def sparsity_report(state: ModelState, weights: dict[str, nn.Parameter], zeros: dict[str, int], pattern: str,
                    notes: list[str]) -> StepReport:
    """Measured sparsity and storage of the pruned weights (`zeros`: each one's zero count after pruning), and what
    the sparsity does not buy. Parameters of offloaded blocks that were not pruned count as dense."""
    total = sum(weight.numel() for weight in weights.values())
    pruned_zeros = sum(zeros[name] for name in weights)
    stored = sum(state.encodings[name].nbytes() for name in weights)
    dense = sum(weight.numel() * weight.element_size() for weight in weights.values())
    all_params = sum(p.numel() for p in state.model.parameters())
    pruned = {id(weight) for weight in weights.values()}
    other_zeros = sum(int((p == 0).sum()) for p in state.model.parameters() if id(p) not in pruned and not p.is_meta)
    metrics: dict[str, float | int | str] = {
        "tensors_pruned": len(weights),
        "params_in_pruned_tensors": total,
        "sparsity": pruned_zeros / total,
        "model_sparsity": (pruned_zeros + other_zeros) / all_params,
        **size_metrics(dense, stored),
        "pattern": pattern,
    }
    notes = [*notes, f"{len(weights)} weights stored as bitmask + kept values", SPEED_NOTE]
    return StepReport(metrics=metrics, notes=notes)
