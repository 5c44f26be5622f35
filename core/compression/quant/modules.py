"""Which weights a quantize step touches, and the loop that encodes them in place."""

from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from core.compression.encoding import decode_into
from core.compression.sparsity.masks import keep_sparse
from core.compression.state import Encoding, ModelState, StepContext, StepReport
from core.errors import InvalidSpec, JobCancelled


@dataclass
class SharedWeight:
    """One weight tensor and every module that uses it (more than one when embeddings are tied)."""

    name: str
    weight: nn.Parameter
    modules: list[str]


def select_modules(
    model: nn.Module, targets: list[str], exclude: list[str], include_embeddings: bool = True
) -> list[tuple[str, nn.Module]]:
    """`nn.Linear` (and `nn.Embedding`) modules whose name matches a target pattern and no exclude pattern.

    Raises InvalidSpec when nothing is selected, so a typo in a pattern never silently quantizes nothing.
    """
    kinds: tuple[type[nn.Module], ...] = (nn.Linear, nn.Embedding) if include_embeddings else (nn.Linear,)
    selected = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, kinds) and matches(name, targets) and not matches(name, exclude)
    ]
    if not selected:
        kind_names = " or ".join(kind.__name__ for kind in kinds)
        raise InvalidSpec(
            f"quantize: targets {targets} minus exclude {exclude} select no {kind_names} module",
            details={"targets": targets, "exclude": exclude},
        )
    return selected


def matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def shared_weights(model: nn.Module, selected: list[tuple[str, nn.Module]]) -> list[SharedWeight]:
    """Group the selected modules by weight Parameter, so a tied weight is quantized once.

    Every module using the weight is listed, selected or not: quantizing a tied embedding also changes the output
    projection that shares it, and the report says so.
    """
    users: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            users.setdefault(id(weight), []).append(name)
    by_identity: dict[int, SharedWeight] = {}
    for name, module in selected:
        key = id(module.weight)
        by_identity.setdefault(key, SharedWeight(name=f"{name}.weight", weight=module.weight, modules=users[key]))
    return list(by_identity.values())


def encode_each(
    state: ModelState, weights: list[SharedWeight], encode: Callable[[SharedWeight], Encoding], ctx: StepContext,
    in_place: bool = False,
) -> None:
    """Encode each weight, overwrite it with its decoded value and record the encoding; polls cancellation and
    reports progress between weights. `in_place`: `encode` already wrote the decoded value into the weight."""
    for index, shared in enumerate(weights):
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


def size_metrics(state: ModelState, weights: list[SharedWeight]) -> dict[str, float | int | str]:
    """Counts and bytes every quantize step reports."""
    original_bytes = sum(shared.weight.numel() * shared.weight.element_size() for shared in weights)
    packed_bytes = sum(state.encodings[shared.name].nbytes() for shared in weights)
    return {
        "modules_quantized": sum(len(shared.modules) for shared in weights),
        "tensors_quantized": len(weights),
        "params_quantized": sum(shared.weight.numel() for shared in weights),
        "original_bytes": original_bytes,
        "packed_bytes": packed_bytes,
        "packed_ratio": packed_bytes / original_bytes,
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
    selected = select_modules(state.model, config.targets, config.exclude, config.include_embeddings)
    weights = shared_weights(state.model, selected)
    encode_each(state, weights, lambda shared: encode(shared.weight), ctx, in_place)
    metrics = size_metrics(state, weights)
    metrics["bits"] = bits
    return StepReport(metrics=metrics, notes=[f"{len(weights)} weights {describe}", *tied_notes(weights)])
