"""What flows through a pipeline: the model, how its weights are packed, the context a step runs in."""

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import nn


@dataclass
class Encoding:
    """A weight stored in a packed form: `format` names the decoder, `tensors` are written to safetensors.

    The in-memory model always holds the decoded (float) weight so that later steps and metrics see exactly what
    a loaded artifact will compute; the encoding is what the saver writes instead of that float tensor.
    """

    format: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass
class Rewrite:
    """A structural change to the model (a module replaced, factored, resized or removed), recorded so that
    `load_compressed` can replay it on a freshly built model before loading the weights. `kind` names a function
    registered with `core.compression.rewrites.register_rewrite`; `module` is the dotted module name."""

    kind: str
    module: str
    meta: dict[str, Any] = field(default_factory=dict)


class BlockResidency(Protocol):
    """Where a model's transformer blocks live when they are not all in memory (`core.compression.offload`): the
    block runners call `load` before a block runs and `release` once the next block's inputs are computed;
    `discard` lets a block go without keeping what changed (after a read-only pass); `block_of` names the block
    holding a module or parameter (None outside the blocks)."""

    def load(self, name: str, block: nn.Module, state: "ModelState") -> None: ...

    def release(self, name: str, block: nn.Module, state: "ModelState") -> None: ...

    def discard(self, name: str, block: nn.Module, state: "ModelState") -> None: ...

    def block_of(self, model: nn.Module, name: str) -> tuple[str, nn.Module] | None: ...

    def whole_model_passes(self, state: "ModelState") -> AbstractContextManager[None]: ...


@dataclass
class ModelState:
    """The model being compressed, the packed encodings of its parameters (keyed by parameter name), the
    structural rewrites applied so far (in order), and the tokenizer of the original folder when it has one.
    `blocks`: None when the whole model is in memory; else where its blocks' weights are between visits (only steps
    whose traits say `runs_by_block` can run then)."""

    model: nn.Module
    encodings: dict[str, Encoding] = field(default_factory=dict)
    rewrites: list[Rewrite] = field(default_factory=list)
    tokenizer: Any = None
    blocks: BlockResidency | None = None


def model_device(model: nn.Module) -> torch.device:
    """Where `model` computes: the device of its first parameter in memory, else of its first buffer (a model
    whose blocks are offloaded keeps its parameters on the meta device until they are read), else the CPU."""
    tensors = [*model.parameters(), *model.buffers()]
    return next((tensor.device for tensor in tensors if not tensor.is_meta), torch.device("cpu"))


def whole_model_passes(state: ModelState) -> AbstractContextManager[None]:
    """Forward passes of the whole model inside the `with` (read-only: calibration statistics) read each offloaded
    block when the pass reaches it and let it go, unchanged, after it; in memory there is nothing to do.

    Example: `with whole_model_passes(state): channel_absmax(state.model, names, input_ids, ctx)`."""
    return nullcontext() if state.blocks is None else state.blocks.whole_model_passes(state)


def load_block(state: ModelState, name: str, block: nn.Module) -> None:
    """Bring block `name` into memory before it runs (a no-op when the whole model is in memory)."""
    if state.blocks is not None:
        state.blocks.load(name, block, state)


def release_block(state: ModelState, name: str, block: nn.Module) -> None:
    """Let block `name` go once the runner is done with it (a no-op when the whole model is in memory)."""
    if state.blocks is not None:
        state.blocks.release(name, block, state)


def discard_block(state: ModelState, name: str, block: nn.Module) -> None:
    """Let block `name` go without keeping what changed (after a read-only visit; a no-op in memory)."""
    if state.blocks is not None:
        state.blocks.discard(name, block, state)


Item = TypeVar("Item")


def each_in_memory(state: ModelState, items: Iterable[Item], name_of: Callable[[Item], str] = str,
                   keep: bool = True) -> Iterator[Item]:
    """Each item (a weight or module, named by `name_of`, in model order) with the block holding it in memory
    while it is yielded: a block is loaded when the first of its items comes and let go when an item of another
    block comes, or at the end; `keep=False` drops what the pass changed (a read-only pass, such as a global
    threshold's). In memory, the items as they are. Steps whose handlers visit their weights through this (or the
    block runners) can run with the blocks offloaded (`runs_by_block`)."""
    current: tuple[str, nn.Module] | None = None
    for item in items:
        found = state.blocks.block_of(state.model, name_of(item)) if state.blocks is not None else None
        if current is not None and (found is None or found[0] != current[0]):
            _let_go(state, current, keep)
            current = None
        if found is not None and current is None:
            load_block(state, *found)
            current = found
        yield item
    if current is not None:
        _let_go(state, current, keep)


def _let_go(state: ModelState, block: tuple[str, nn.Module], keep: bool) -> None:
    assert state.blocks is not None
    if keep:
        state.blocks.release(*block, state)
    else:
        state.blocks.discard(*block, state)


@dataclass
class StepReport:
    """What a step tells the user: metrics (stored per step; mostly numbers, the `waterfall` record a dict) and
    plain-language notes."""

    metrics: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _never_stop() -> bool:
    return False


def _ignore_progress(fraction: float, message: str) -> None:
    return None


def _default_texts(dataset_id: str | None) -> list[str]:
    from core.compression.corpus import default_corpus

    if dataset_id is not None:
        raise LookupError(f"no dataset provider is configured to resolve dataset {dataset_id!r}")
    return default_corpus()


def _no_teacher(ref: str) -> nn.Module:
    raise LookupError(f"no teacher provider is configured to resolve teacher {ref!r}")


@dataclass
class StepContext:
    """How core talks to whoever runs it, without knowing about databases or queues.

    report(fraction, message): progress within the current step, fraction in [0, 1].
    should_stop(): True once the job was cancelled; long steps poll it between units of work.
    texts(dataset_id): the text samples of an uploaded dataset (the worker resolves the tenant's own datasets), or
        the default calibration corpus for None.
    work_dir: scratch space of this job (checkpoints, temporary files); None when the caller gives none.
    teacher(ref): a fresh copy of a teacher model for the training steps, in eval mode on `device`: "original" is
        the uploaded model before any step ran, any other ref a model id of the same tenant (the worker resolves
        it); raises LookupError when it cannot.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report: Callable[[float, str], None] = _ignore_progress
    should_stop: Callable[[], bool] = _never_stop
    texts: Callable[[str | None], list[str]] = _default_texts
    work_dir: Path | None = None
    teacher: Callable[[str], nn.Module] = _no_teacher


def size_metrics(original_bytes: int, stored_bytes: int) -> dict[str, float | int | str]:
    """The size figures of every step that changes how weights are stored, under one set of names:
    `original_bytes` (the weights the step touched, as they were before it), `stored_bytes` (the same weights as the
    artifact stores them after it) and `stored_ratio` (stored / original). Example: int8 rtn on fp32 weights gives a
    `stored_ratio` a little over 0.25 (codes plus per-row scales)."""
    return {"original_bytes": original_bytes, "stored_bytes": stored_bytes,
            "stored_ratio": stored_bytes / original_bytes if original_bytes else 1.0}


def encoded_bytes(state: ModelState) -> int:
    """Bytes of every packed or coded weight in the model (`encoded_bytes`, reported by training steps)."""
    return sum(encoding.nbytes() for encoding in state.encodings.values())
