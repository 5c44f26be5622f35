"""Low-rank decomposition steps: plain SVD, activation-aware SVD (ASVD) and whitened SVD (SVD-LLM)."""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from core.compression.configs.decompose import DecomposeASVD, DecomposeSVD, DecomposeSVDLLM
from core.compression.registry import register_step
from core.compression.rewrites import apply_rewrite
from core.compression.select import refuse_encoded, select_modules
from core.compression.sparsity import lowrank
from core.compression.sparsity.blockwise import (
    InputStats,
    block_statistics,
    calibration_batches,
)
from core.compression.sparsity.reconstruct import ReconstructionResult, reconstruct_block, reconstruction_metrics
from core.compression.state import ModelState, Rewrite, StepContext, StepReport, each_in_memory
from core.errors import JobCancelled

# (weight, input stats) -> (U, S, Vh, transform) of the matrix to truncate
Analysis = Callable[[torch.Tensor, InputStats | None], tuple[Any, ...]]


@dataclass
class _Tally:
    factored: dict[str, int] = field(default_factory=dict)  # module -> rank
    skipped: list[str] = field(default_factory=list)  # no parameter saving at the requested rank


@register_step(DecomposeSVD)
def decompose_svd_step(state: ModelState, config: DecomposeSVD, ctx: StepContext) -> StepReport:
    """Truncated SVD of the selected Linear and Conv2d layers, each replaced in place by two smaller layers.

    Example recipe step: `{"type": "decompose", "method": "svd", "energy": 0.9}`.
    """
    modules = _modules(state, config, (nn.Linear, nn.Conv2d))
    before, tally = _parameter_count(state), _Tally()
    for index, (name, module) in enumerate(each_in_memory(state, modules.items(), lambda item: item[0])):
        if ctx.should_stop():
            raise JobCancelled(f"cancelled while decomposing, before {name}")
        if isinstance(module, nn.Conv2d):
            _factor_conv(state, name, module, config, tally)
        else:
            _factor_linear(state, name, module, config, tally, lowrank.plain(module.weight.detach()))
        ctx.report((index + 1) / len(modules), f"decomposed {name}")
    return _report(state, before, tally, [])


@register_step(DecomposeASVD)
def decompose_asvd_step(state: ModelState, config: DecomposeASVD, ctx: StepContext) -> StepReport:
    """ASVD of the selected Linear layers on calibration activations, block by block, replaced in place.

    Example recipe step: `{"type": "decompose", "method": "asvd", "params_kept": 0.8, "alpha": 0.5}`.
    """
    def analyse(weight: torch.Tensor, stats: InputStats | None) -> tuple[Any, ...]:
        return lowrank.activation_scaled(weight, stats.abs_sum / stats.count, config.alpha)

    return _calibrated(state, config, ctx, analyse, {"abs"})


@register_step(DecomposeSVDLLM)
def decompose_svd_llm_step(state: ModelState, config: DecomposeSVDLLM, ctx: StepContext) -> StepReport:
    """SVD-LLM (whitened SVD) of the selected Linear layers on calibration activations, block by block, in place.

    Example recipe step: `{"type": "decompose", "method": "svd_llm", "params_kept": 0.8}`.
    """
    def analyse(weight: torch.Tensor, stats: InputStats | None) -> tuple[Any, ...]:
        return lowrank.whitened(weight, stats.gram / stats.count, config.dampening)

    return _calibrated(state, config, ctx, analyse, {"gram"})


def _modules(state: ModelState, config: lowrank.DecomposeConfig,
             kinds: tuple[type[nn.Module], ...]) -> dict[str, nn.Module]:
    modules = select_modules(state.model, config, kinds, tied="skipped").modules
    names = [f"{name}.{p}" for name, m in modules.items() for p, _ in m.named_parameters()]
    refuse_encoded(state, names, "decompose")
    return modules


def _calibrated(state: ModelState, config: DecomposeASVD | DecomposeSVDLLM, ctx: StepContext, analyse: Analysis,
                want: set[str]) -> StepReport:
    layers = _modules(state, config, (nn.Linear,))
    before, tally = _parameter_count(state), _Tally()
    data = calibration_batches(state, config, ctx)
    rebuilt: list[ReconstructionResult] = []
    blocks = block_statistics(state, layers, data.batches, want, ctx, "decomposing",
                              with_targets=config.reconstruct is not None)
    for run, mine, stats in blocks:
        for name, layer in mine.items():
            _factor_linear(state, name, layer, config, tally, analyse(layer.weight.detach(), stats.pop(name)))
        factored = [state.model.get_submodule(name) for name in mine if name in tally.factored]
        if config.reconstruct is not None and run.targets is not None and factored:
            trainable = {param: None for pair in factored for param in pair.parameters()}
            rebuilt.append(reconstruct_block(run, trainable, config.reconstruct, config.calibration.seed))
        ctx.report((len(tally.factored) + len(tally.skipped)) / len(layers), f"decomposed {run.name or 'the model'}")
    untouched = sorted(set(layers) - set(tally.factored) - set(tally.skipped))
    notes = data.notes + ([f"left as is (outside the repeated blocks): {', '.join(untouched)}"] if untouched else [])
    report = _report(state, before, tally, notes)
    if rebuilt:
        report.metrics.update(reconstruction_metrics(rebuilt))
    return report


@torch.no_grad()
def _factor_linear(state: ModelState, name: str, linear: nn.Linear, config: lowrank.DecomposeConfig, tally: _Tally,
                   analysis: tuple[Any, ...]) -> None:
    u, s, vh, transform = analysis
    out_features, in_features = linear.weight.shape
    rank = lowrank.choose_rank(s, in_features + out_features, linear.weight.numel(), config)
    if rank < 1 or rank * (in_features + out_features) >= linear.weight.numel():
        tally.skipped.append(name)
        return
    second, first = lowrank.truncate(u, s, vh, rank)
    first = lowrank.finish(first, transform)
    _install_pair(state, Rewrite(lowrank.FACTOR_LINEAR, name, {"rank": rank}), first, second, linear.bias)
    tally.factored[name] = rank


@torch.no_grad()
def _factor_conv(state: ModelState, name: str, conv: nn.Conv2d, config: DecomposeSVD, tally: _Tally) -> None:
    out_channels, in_channels, kh, kw = conv.weight.shape
    if not lowrank.factorable_conv(conv):
        tally.skipped.append(name)
        return
    u, s, vh = lowrank.svd_factors(lowrank.conv_matrix(conv.weight.detach()))
    rank = lowrank.choose_rank(s, in_channels * kh + out_channels * kw, conv.weight.numel(), config)
    if rank < 1 or rank * (in_channels * kh + out_channels * kw) >= conv.weight.numel():
        tally.skipped.append(name)
        return
    vertical, horizontal = lowrank.conv_kernels(*lowrank.truncate(u, s, vh, rank), conv.weight.shape)
    _install_pair(state, Rewrite(lowrank.FACTOR_CONV2D, name, {"rank": rank}), vertical, horizontal, conv.bias)
    tally.factored[name] = rank


@torch.no_grad()
def _install_pair(state: ModelState, rewrite: Rewrite, first: torch.Tensor, second: torch.Tensor,
                  bias: torch.Tensor | None) -> None:
    """Replace the module by its two factors (recorded for load_compressed) and fill their weights; the original
    bias moves to the second factor."""
    apply_rewrite(state, rewrite)
    pair = state.model.get_submodule(rewrite.module)
    pair[0].weight.copy_(first)
    pair[1].weight.copy_(second)
    if bias is not None:
        pair[1].bias.copy_(bias)


def _parameter_count(state: ModelState) -> int:
    return sum(p.numel() for p in state.model.parameters())


def _report(state: ModelState, before: int, tally: _Tally, notes: list[str]) -> StepReport:
    after = _parameter_count(state)
    metrics: dict[str, float | int | str] = {
        "layers_factored": len(tally.factored),
        "layers_skipped": len(tally.skipped),
        "params_before": before,
        "params_after": after,
        "params_ratio": after / before,
    }
    if tally.skipped:
        notes.append(f"not factored (the factors would not be smaller): {', '.join(tally.skipped[:10])}"
                     + (f" and {len(tally.skipped) - 10} more" if len(tally.skipped) > 10 else ""))
    notes.append("each factored layer runs as two smaller dense layers with ordinary kernels: fewer FLOPs, and a "
                 "speedup only when the ranks are low enough to outweigh the extra layer")
    return StepReport(metrics=metrics, notes=notes)
