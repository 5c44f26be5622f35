"""Run a transformer block by block on calibration data: capture what the first block receives, then feed each
block the outputs of the block before it. Only one block's activations and statistics are alive at a time."""

import inspect
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.compression.state import model_device


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once the first block's inputs are known."""


@dataclass
class BlockCall:
    """The positional and keyword arguments one mini-batch passes to a block (hidden states, masks, rotary
    embeddings, ...); the masks and embeddings are the same for every block of the model."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def run(self, block: nn.Module) -> torch.Tensor:
        output = block(*self.args, **self.kwargs)
        return output[0] if isinstance(output, tuple) else output

    def with_hidden(self, hidden: torch.Tensor) -> "BlockCall":
        if self.args:
            return BlockCall((hidden, *self.args[1:]), self.kwargs)
        return BlockCall((), {**self.kwargs, "hidden_states": hidden})


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The `nn.ModuleList` holding the most parameters (a transformer's layers), or None if there is none."""
    lists = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]
    lists = [(name, module) for name, module in lists if len(module) > 0]
    if not lists:
        return None
    return max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))


@torch.no_grad()
def first_block_calls(
    model: nn.Module, first_block: nn.Module, input_ids: torch.Tensor, batch_size: int
) -> list[BlockCall]:
    """Run the model on `input_ids` in mini-batches up to `first_block` and record what it is called with."""
    calls: list[BlockCall] = []

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append(BlockCall(args, kwargs))
        raise _Captured

    device = model_device(model)
    handle = first_block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for batch in input_ids.split(batch_size):
            with suppress(_Captured):
                model(input_ids=batch.to(device), **_no_cache(model))
    finally:
        handle.remove()
    return calls


def _no_cache(model: nn.Module) -> dict[str, bool]:
    # A KV cache would only cost memory during calibration.
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


@contextmanager
def input_hessians(linears: dict[str, nn.Linear]) -> Iterator[dict[str, torch.Tensor]]:
    """While active, every forward of the given Linear modules adds xᵀx of their inputs to `hessians[name]`."""
    hessians = {name: torch.zeros(m.in_features, m.in_features, device=m.weight.device) for name, m in linears.items()}

    def hook_for(name: str):
        def accumulate(module: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            hessians[name].addmm_(x.T, x)

        return accumulate

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in linears.items()]
    try:
        yield hessians
    finally:
        for handle in handles:
            handle.remove()
