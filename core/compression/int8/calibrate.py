"""Run calibration text through a model and watch the inputs of chosen modules (activation statistics)."""

from collections.abc import Callable

import torch
from torch import nn

from core.compression.configs.quantize import CalibrationData
from core.compression.corpus import CalibrationBatch, calibration_batch
from core.compression.int8.observers import RangeStats
from core.compression.state import ModelState, StepContext, model_device
from core.errors import JobCancelled

TOKENS_PER_FORWARD = 2048  # rows are fed in chunks of about this many tokens, to bound activation memory
InputWatcher = Callable[[str, torch.Tensor], None]


def calibration_ids(state: ModelState, calibration: CalibrationData, ctx: StepContext) -> CalibrationBatch:
    """The token windows a step calibrates on (seeded random ids when the model has no tokenizer), no longer than
    the model's position limit."""
    config = state.model.config
    limit = getattr(config, "max_position_embeddings", None) or calibration.seq_len
    seq_len = min(calibration.seq_len, limit)
    texts = ctx.texts(calibration.dataset_id) if state.tokenizer is not None else []
    batch = calibration_batch(texts, state.tokenizer, calibration.num_samples, seq_len, config.vocab_size)
    if seq_len < calibration.seq_len:
        batch.notes.append(f"seq_len capped at the model's {seq_len} positions")
    return batch


@torch.no_grad()
def watch_inputs(model: nn.Module, names: list[str], input_ids: torch.Tensor, watcher: InputWatcher,
                 ctx: StepContext) -> None:
    """Run `input_ids` through `model` in chunks; `watcher(name, x)` sees the input of each named module."""
    handles = [
        model.get_submodule(name).register_forward_pre_hook(_hook(name, watcher)) for name in names
    ]
    rows = max(1, TOKENS_PER_FORWARD // input_ids.shape[1])
    device = model_device(model)
    try:
        for start in range(0, input_ids.shape[0], rows):
            if ctx.should_stop():
                raise JobCancelled("cancelled during calibration")
            model(input_ids=input_ids[start : start + rows].to(device))
    finally:
        for handle in handles:
            handle.remove()


def _hook(name: str, watcher: InputWatcher) -> Callable[[nn.Module, tuple], None]:
    def hook(module: nn.Module, args: tuple) -> None:
        watcher(name, args[0])

    return hook


def channel_absmax(model: nn.Module, names: list[str], input_ids: torch.Tensor,
                   ctx: StepContext) -> dict[str, torch.Tensor]:
    """max |x| per input channel (last dimension) of each named module over the calibration tokens."""
    maxima: dict[str, torch.Tensor] = {}

    def watch(name: str, x: torch.Tensor) -> None:
        current = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
        maxima[name] = current if name not in maxima else torch.maximum(maxima[name], current)

    watch_inputs(model, names, input_ids, watch, ctx)
    return maxima


def range_stats(model: nn.Module, factors: dict[str, torch.Tensor | None], input_ids: torch.Tensor, bins: int | None,
                ctx: StepContext) -> dict[str, RangeStats]:
    """Per module: exact input range, then (if `bins`) a histogram over it. `factors[name]`, when not None,
    multiplies the input first, as the int8 module will at run time."""
    stats = {name: RangeStats() for name in factors}

    def scaled(name: str, x: torch.Tensor) -> torch.Tensor:
        factor = factors[name]
        return x if factor is None else x * factor

    watch_inputs(model, list(factors), input_ids, lambda n, x: stats[n].observe_range(scaled(n, x)), ctx)
    if bins is not None:
        watch_inputs(model, list(factors), input_ids, lambda n, x: stats[n].observe_histogram(scaled(n, x), bins), ctx)
    return stats
