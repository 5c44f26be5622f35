"""The optimisation loop shared by distill and lora: AdamW, warm-up then linear decay, gradient clipping, progress
and loss through `ctx.report`, cancellation between steps, checkpoints every N steps and resume from the last."""

import math
from collections.abc import Callable

import torch
from torch import nn

from core.compression.state import StepContext
from core.compression.training.checkpoint import Checkpoints, Progress
from core.errors import JobCancelled

WARMUP_SHARE = 0.05
MAX_GRAD_NORM = 1.0
LossFn = Callable[[int], torch.Tensor]  # step index -> loss of that step's batch


def train(params: dict[str, nn.Parameter], loss_at: LossFn, steps: int, lr: float, ctx: StepContext,
          checkpoints: Checkpoints, every: int, progress_share: tuple[float, float] = (0.1, 0.9)) -> Progress:
    """Run optimizer steps until `steps` are done (resuming after the last checkpoint) and return the progress."""
    optimizer = _adamw(list(params.values()), lr)
    progress = checkpoints.restore(params, optimizer) or Progress()
    if progress.step:
        ctx.report(progress_share[0], f"resumed from the checkpoint after step {progress.step}")
    low, high = progress_share
    while progress.step < steps:
        if ctx.should_stop():
            raise JobCancelled(f"cancelled during training, after step {progress.step} of {steps}")
        loss = _one_step(optimizer, params, loss_at(progress.step), _lr(lr, progress.step, steps))
        progress.step += 1
        progress.losses.append(loss)
        ctx.report(low + (high - low) * progress.step / steps, f"step {progress.step}/{steps} loss {loss:.4f}")
        if progress.step % every == 0 or progress.step == steps:
            checkpoints.save(progress, params, optimizer)
    return progress


def _adamw(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel where torch has one for these tensors: the per-tensor loop costs as much as a
    forward pass of a small model on CPU."""
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=fused)


def _one_step(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter], loss: torch.Tensor,
              lr: float) -> float:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the training loss became {loss.item()}; lower lr")
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(params.values()), MAX_GRAD_NORM, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _lr(peak: float, step: int, steps: int) -> float:
    """Linear warm-up over the first 5% of the steps, then linear decay to zero: a function of the step alone."""
    warmup = max(1, math.ceil(WARMUP_SHARE * steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (steps - step) / max(1, steps - warmup))
