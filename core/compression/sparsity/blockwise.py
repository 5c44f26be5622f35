"""Calibration inputs and the block-by-block runner used by the activation-aware methods.

Transformers are processed one block (decoder/encoder layer) at a time, as SparseGPT and Wanda do: the inputs of
the first block are captured once, each block's layers are measured and compressed, and the block's new outputs
become the next block's inputs, so later blocks adapt to the errors of earlier ones. A model without such a list
of blocks (a CNN) is treated as a single block fed with the calibration batches.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from core.compression.configs.calibration import Calibrated
from core.compression.state import ModelState, StepContext, load_block, model_device, release_block
from core.errors import JobCancelled

Batch = dict[str, torch.Tensor]
IMAGE_SIZE = 32


@dataclass
class BlockInput:
    """The positional and keyword arguments one block was called with for one calibration batch."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class CalibrationData:
    batches: list[Batch]
    notes: list[str] = field(default_factory=list)


def calibration_batches(state: ModelState, step: Calibrated, ctx: StepContext) -> CalibrationData:
    """`num_samples` batches of one `seq_len`-token window each (the step's calibration block): from the calibration
    text when the model has a tokenizer, else seeded random token ids (or random images for vision models), and a
    note saying which."""
    model_config, config = state.model.config, step.calibration
    generator = torch.Generator().manual_seed(config.seed)
    if not hasattr(model_config, "vocab_size"):
        shape = (1, getattr(model_config, "num_channels", 3), IMAGE_SIZE, IMAGE_SIZE)
        batches = [{"pixel_values": torch.randn(shape, generator=generator)} for _ in range(config.num_samples)]
        note = f"calibrated on {config.num_samples} seeded random {IMAGE_SIZE}×{IMAGE_SIZE} images"
        return CalibrationData(batches, [note])
    if state.tokenizer is None:
        ids = torch.randint(0, model_config.vocab_size, (config.num_samples, config.seq_len), generator=generator)
        note = f"no tokenizer: calibrated on {config.num_samples} × {config.seq_len} seeded random token ids"
        return CalibrationData([{"input_ids": row[None]} for row in ids], [note])
    return _text_windows(state.tokenizer, ctx.texts(config.dataset_id), config)


def _text_windows(tokenizer: Any, texts: list[str], config: Any) -> CalibrationData:
    """Consecutive windows of the concatenated corpus; fewer than asked when the corpus is short."""
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    count = min(config.num_samples, ids.numel() // config.seq_len)
    if count == 0:
        raise ValueError(f"the calibration text has {ids.numel()} tokens, fewer than one window of {config.seq_len}")
    windows = ids[: count * config.seq_len].view(count, config.seq_len)
    source = config.dataset_id or "the default corpus"
    note = f"calibrated on {count} × {config.seq_len} tokens of {source}"
    return CalibrationData([{"input_ids": row[None]} for row in windows], [note])


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's list of repeated blocks: the nn.ModuleList holding the most parameters, or None."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    if not lists:
        return None
    return max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once the first block's inputs are known."""


@torch.no_grad()
def on_device(batch: Batch, device: torch.device) -> Batch:
    """The calibration batch on the model's device (batches are built on the CPU)."""
    return {key: value.to(device) for key, value in batch.items()}


@torch.no_grad()
def first_block_inputs(model: nn.Module, block: nn.Module, batches: list[Batch]) -> list[BlockInput]:
    captured: list[BlockInput] = []

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(BlockInput(args, dict(kwargs)))
        raise _Captured

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    device = model_device(model)
    try:
        for batch in batches:
            batch = on_device(batch, device)
            with suppress(_Captured):
                model(**batch, use_cache=False) if hasattr(model.config, "use_cache") else model(**batch)
    finally:
        handle.remove()
    return captured


def block_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def propagate(block: nn.Module, inputs: list[BlockInput]) -> list[BlockInput]:
    """The next block's inputs: this block's outputs in place of its hidden states, other arguments unchanged."""
    return [with_hidden(item, block_output(block(*item.args, **item.kwargs))) for item in inputs]


def with_hidden(item: BlockInput, hidden: torch.Tensor) -> BlockInput:
    """`item` with its hidden states replaced by `hidden`."""
    if item.args:
        return BlockInput((hidden, *item.args[1:]), item.kwargs)
    return BlockInput((), {**item.kwargs, "hidden_states": hidden})


GRAM_CHUNK_ROWS = 1024  # input rows upcast to float64 at a time


@dataclass
class InputStats:
    """Running statistics of one layer's inputs, each row of the flattened input (a token or a pixel) one sample."""

    gram: torch.Tensor | None = None  # X^T X (float64)
    abs_sum: torch.Tensor | None = None  # sum |x| per input feature
    sq_sum: torch.Tensor | None = None  # sum x² per input feature
    count: int = 0

    def add(self, x: torch.Tensor, want: set[str]) -> None:
        x = x.reshape(-1, x.shape[-1])
        self.count += x.shape[0]
        # By chunks of rows, the Gram matrix summed in place: a whole float64 copy of a batch's inputs, then
        # `gram + x.T @ x` as a new tensor, held three d x d float64 matrices and the copy at once (1 GB at a 1.1B
        # model's down_proj, more than the rest of the block's statistics).
        for rows in x.split(GRAM_CHUNK_ROWS):
            rows = rows.to(torch.float64)
            if "gram" in want:
                if self.gram is None:
                    self.gram = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device)
                self.gram.addmm_(rows.T, rows)
            if "abs" in want:
                self.abs_sum = _plus(self.abs_sum, rows.abs().sum(dim=0))
            if "sq" in want:
                self.sq_sum = _plus(self.sq_sum, (rows * rows).sum(dim=0))


def _plus(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if total is None else total + value


@contextmanager
def recording(modules: dict[str, nn.Module], want: set[str]) -> Iterator[dict[str, InputStats]]:
    """Accumulate InputStats of each module's input while the block runs inside the `with`."""
    stats = {name: InputStats() for name in modules}
    handles = [m.register_forward_pre_hook(_recorder(stats[name], want)) for name, m in modules.items()]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


def _recorder(stats: InputStats, want: set[str]) -> Callable[[nn.Module, tuple], None]:
    def hook(module: nn.Module, args: tuple) -> None:
        stats.add(args[0].detach(), want)

    return hook


@torch.no_grad()
def run_all(block: nn.Module, inputs: list[BlockInput]) -> None:
    for item in inputs:
        block(*item.args, **item.kwargs)


@dataclass
class BlockRun:
    """One block during a block-by-block pass: its inputs in the model as compressed so far and, when asked for,
    `targets`: the uncompressed model's outputs of this block (fed by the uncompressed earlier blocks)."""

    name: str
    module: nn.Module
    inputs: list[BlockInput]
    targets: list[torch.Tensor] | None = None


def sequential_blocks(state: ModelState, batches: list[Batch], with_targets: bool = False) -> Iterator[BlockRun]:
    """Yield each block of `state.model` with its calibration inputs; the inputs of block i+1 are computed after the
    caller has compressed block i, and only then is block i released (`release_block`: a no-op in memory). Without
    repeated blocks the whole model is one block named "" (and has no targets)."""
    model = state.model
    found = transformer_blocks(model)
    if found is None:
        yield BlockRun("", model, [BlockInput((), dict(batch)) for batch in batches])
        return
    prefix, blocks = found
    inputs = first_block_inputs(model, blocks[0], batches)
    dense = inputs if with_targets else []  # without targets, holding the first inputs would only cost memory
    for index, block in enumerate(blocks):
        name = f"{prefix}.{index}"
        load_block(state, name, block)
        targets = _outputs(block, dense) if with_targets else None
        yield BlockRun(name, block, inputs, targets)
        inputs = propagate(block, inputs)
        if targets is not None:
            dense = [with_hidden(item, target) for item, target in zip(dense, targets, strict=True)]
        release_block(state, name, block)


@torch.no_grad()
def _outputs(block: nn.Module, inputs: list[BlockInput]) -> list[torch.Tensor]:
    return [block_output(block(*item.args, **item.kwargs)) for item in inputs]


def inside(name: str, block_name: str) -> bool:
    return block_name == "" or name.startswith(block_name + ".")


def block_statistics(
    state: ModelState, layers: dict[str, nn.Module], batches: list[Batch], want: set[str], ctx: StepContext, verb: str,
    with_targets: bool = False,
) -> Iterator[tuple[BlockRun, dict[str, nn.Module], dict[str, InputStats]]]:
    """Block by block: the block, the `layers` inside it and their input statistics while it ran on its calibration
    inputs. The caller compresses those layers before the next block's inputs are computed from this block."""
    for run in sequential_blocks(state, batches, with_targets):
        if ctx.should_stop():
            raise JobCancelled(f"cancelled while {verb}, before {run.name or 'the model'}")
        mine = {name: layer for name, layer in layers.items() if inside(name, run.name)}
        with recording(mine, want) as stats:
            run_all(run.module, run.inputs)
        yield run, mine, stats
        # The caller is done with this block: free its statistics (float64 Gram matrices, ~0.5 GB for a 1B model's
        # block) now, not once the next block's have been gathered beside them.
        stats.clear()
