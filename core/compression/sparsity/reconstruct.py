"""Block-wise reconstruction (in the spirit of EBFT / block reconstruction in BRECQ): after a block's layers were
compressed one-shot (pruned, or factored into low-rank pairs), train their weights so that the block reproduces the
uncompressed model's outputs of that block on the calibration inputs. Each layer's own solver (SparseGPT, SVD-LLM,
or none for Wanda) only sees its own inputs; this also corrects the error the earlier, already-compressed blocks pass
on."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.compression.configs.calibration import Reconstruction
from core.compression.sparsity.blockwise import BlockRun, block_output


@dataclass
class ReconstructionResult:
    error_before: float
    error_after: float
    kept: bool  # False when training made the error worse and the one-shot weights were restored


def reconstruct_block(run: BlockRun, trainable: dict[nn.Parameter, torch.Tensor | None], config: Reconstruction,
                      seed: int = 0) -> ReconstructionResult:
    """Adam on the `trainable` parameters (where a mask is given, its zero entries are held at exactly zero) to
    minimise the mean squared error between the block's outputs on `run.inputs` and `run.targets`."""
    if run.targets is None:
        raise ValueError("reconstruction needs the uncompressed block outputs (targets)")
    weights, masks = list(trainable), list(trainable.values())
    one_shot = [weight.detach().clone() for weight in weights]
    before = _error(run)
    grad_flags = {param: param.requires_grad for param in run.module.parameters()}
    run.module.requires_grad_(False)
    for weight in weights:
        weight.requires_grad_(True)
    try:
        _train(run, weights, masks, config, seed)
    finally:
        for param, flag in grad_flags.items():
            param.requires_grad_(flag)
    after = _error(run)
    if after >= before:
        with torch.no_grad():
            for weight, saved in zip(weights, one_shot, strict=True):
                weight.copy_(saved)
        return ReconstructionResult(before, before, kept=False)
    return ReconstructionResult(before, after, kept=True)


def _train(run: BlockRun, weights: list[nn.Parameter], masks: list[torch.Tensor | None], config: Reconstruction,
           seed: int) -> None:
    optimizer = torch.optim.Adam(weights, lr=config.lr)
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(config.epochs):
            for index in torch.randperm(len(run.inputs), generator=generator).tolist():
                item = run.inputs[index]
                output = block_output(run.module(*item.args, **item.kwargs))
                F.mse_loss(output, run.targets[index]).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for weight, mask in zip(weights, masks, strict=True):
                        if mask is not None:
                            weight.mul_(mask)


@torch.no_grad()
def _error(run: BlockRun) -> float:
    total = sum(float(F.mse_loss(block_output(run.module(*item.args, **item.kwargs)), target))
                for item, target in zip(run.inputs, run.targets, strict=True))
    return total / len(run.inputs)


def reconstruction_metrics(results: list[ReconstructionResult]) -> dict[str, float | int]:
    """Block output error against the uncompressed model, summed over blocks, before and after reconstruction."""
    before, after = sum(r.error_before for r in results), sum(r.error_after for r in results)
    return {"reconstruction_error_before": before, "reconstruction_error_after": after,
            "reconstruction_error_ratio": after / before if before else 1.0,
            "reconstruction_blocks_kept": sum(r.kept for r in results)}
