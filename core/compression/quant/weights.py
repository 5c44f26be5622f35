"""Which weights a quantize step touches, and the loop that encodes them in place."""

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from core.compression.encoding import decode_into
from core.compression.select import SharedWeight, select_modules
from core.compression.sparsity.masks import keep_sparse
from core.compression.state import Encoding, ModelState, StepContext, StepReport, each_in_memory, size_metrics
from core.errors import JobCancelled


def selected_weights(model: nn.Module, config: Any) -> list[SharedWeight]:
    """The weights a weight-only quantize step encodes: those of the selected `nn.Linear` (and, with
    `include_embeddings`, `nn.Embedding`) modules, a tied weight once for all the modules sharing it."""
    kinds: tuple[type[nn.Module], ...] = (nn.Linear, nn.Embedding) if config.include_embeddings else (nn.Linear,)
    return select_modules(model, config, kinds, tied="shared").shared_weights()


def encode_each(
    state: ModelState, weights: list[SharedWeight], encode: Callable[[SharedWeight], Encoding], ctx: StepContext,
    in_place: bool = False,
) -> None:
    """Encode each weight, overwrite it with its decoded value and record the encoding; polls cancellation and
    reports progress between weights. `in_place`: `encode` already wrote the decoded value into the weight."""
    for index, shared in enumerate(each_in_memory(state, weights, lambda shared: shared.name)):
        if ctx.should_stop():
            raise JobCancelled(f"cancelled while quantizing, before {shared.name}")
        # A pruned weight keeps its mask around the new codes: its zeros stay exact and unstored (a zero encodes
        # to code 0, so a weight decoded in place already holds them).
        encoding = keep_sparse(state, shared.name, encode(shared))
        state.encodings[shared.name] = encoding if in_place else store_decoded(shared.weight, encoding)
        ctx.report((index + 1) / len(weights), f"quantized {shared.name}")


@torch.no_grad()
def store_decoded(weight: nn.Parameter, encoding: Encoding) -> Encoding:
    """Overwrite `weight` with what `encoding` decodes to (what a loaded artifact computes) and return it."""
    # Writing into the Parameter's own memory keeps the object, so modules that share it (tied weights) stay tied.
    decode_into(encoding, weight.data)
    return encoding


def quantize_metrics(state: ModelState, weights: list[SharedWeight]) -> dict[str, float | int | str]:
    """Counts and bytes every quantize step reports."""
    original_bytes = sum(shared.weight.numel() * shared.weight.element_size() for shared in weights)
    packed_bytes = sum(state.encodings[shared.name].nbytes() for shared in weights)
    return {
        "modules_quantized": sum(len(shared.modules) for shared in weights),
        "tensors_quantized": len(weights),
        "params_quantized": sum(shared.weight.numel() for shared in weights),
        **size_metrics(original_bytes, packed_bytes),
    }


def tied_notes(weights: list[SharedWeight]) -> list[str]:
    return [
        f"{shared.name} is shared by {', '.join(shared.modules)}; quantized and stored once"
        for shared in weights
        if len(shared.modules) > 1
    ]


def quantize_selected(state: ModelState, config: Any, ctx: StepContext, encode: Callable[[nn.Parameter], Encoding],
                      bits: int, describe: str, in_place: bool = False) -> StepReport:
    """The body every weight-only method shares: select the modules by the config's patterns, encode each weight
    once (tied weights too) in place, and report sizes. `describe` completes "<n> weights <describe>";
    `in_place`: `encode` also overwrites the weight with its decoded value."""
    weights = selected_weights(state.model, config)
    encode_each(state, weights, lambda shared: encode(shared.weight), ctx, in_place)
    metrics = quantize_metrics(state, weights)
    metrics["bits"] = bits
    return StepReport(metrics=metrics, notes=[f"{len(weights)} weights {describe}", *tied_notes(weights)])
