"""Weight-only quantization steps."""

from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import nn

from core.compression.encoding import decode, quantize_rtn
from core.compression.registry import register_step
from core.compression.spec import QuantizeRTN
from core.compression.state import Encoding, ModelState, StepContext, StepReport
from core.errors import InvalidSpec, JobCancelled


@dataclass
class _SharedWeight:
    """One weight tensor and every module that uses it (more than one when embeddings are tied)."""

    name: str
    weight: nn.Parameter
    modules: list[str]


@register_step(QuantizeRTN)
def quantize_rtn_step(state: ModelState, config: QuantizeRTN, ctx: StepContext) -> StepReport:
    """Round-to-nearest int8 quantization of the selected `nn.Linear` (and `nn.Embedding`) weights, in place.

    Each selected weight is overwritten with its decoded value, so later steps and metrics see exactly what the
    saved artifact computes; the packed encoding goes to `state.encodings["<module>.weight"]`. A weight shared by
    several modules (tied input/output embeddings) is quantized and stored once, under its first module's name.

    Example recipe step: `{"type": "quantize", "granularity": "per_channel", "exclude": ["*.down_proj"]}`.
    """
    weights = _shared_weights(state.model, _select_modules(state.model, config))
    for index, shared in enumerate(weights):
        if ctx.should_stop():
            raise JobCancelled(f"cancelled while quantizing, before {shared.name}")
        state.encodings[shared.name] = _quantize_in_place(shared.weight, config)
        ctx.report((index + 1) / len(weights), f"quantized {shared.name}")
    return _report(state, weights, config)


def _select_modules(model: nn.Module, config: QuantizeRTN) -> list[tuple[str, nn.Module]]:
    """Modules of a quantizable type whose name matches a target pattern and no exclude pattern."""
    kinds: tuple[type[nn.Module], ...] = (nn.Linear, nn.Embedding) if config.include_embeddings else (nn.Linear,)
    selected = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, kinds) and _matches(name, config.targets) and not _matches(name, config.exclude)
    ]
    if not selected:
        kind_names = " or ".join(kind.__name__ for kind in kinds)
        raise InvalidSpec(
            f"quantize: targets {config.targets} minus exclude {config.exclude} select no {kind_names} module",
            details={"targets": config.targets, "exclude": config.exclude},
        )
    return selected


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def _shared_weights(model: nn.Module, selected: list[tuple[str, nn.Module]]) -> list[_SharedWeight]:
    """Group the selected modules by weight Parameter, so a tied weight is quantized once.

    Every module using the weight is listed, selected or not: quantizing a tied embedding also changes the output
    projection that shares it, and the report says so.
    """
    users: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            users.setdefault(id(weight), []).append(name)
    by_identity: dict[int, _SharedWeight] = {}
    for name, module in selected:
        key = id(module.weight)
        by_identity.setdefault(key, _SharedWeight(name=f"{name}.weight", weight=module.weight, modules=users[key]))
    return list(by_identity.values())


@torch.no_grad()
def _quantize_in_place(weight: nn.Parameter, config: QuantizeRTN) -> Encoding:
    encoding = quantize_rtn(weight, bits=config.bits, granularity=config.granularity, symmetric=config.symmetric)
    # copy_ keeps the Parameter object, so modules that share it (tied weights) stay tied.
    weight.copy_(decode(encoding))
    return encoding


def _report(state: ModelState, weights: list[_SharedWeight], config: QuantizeRTN) -> StepReport:
    original_bytes = sum(shared.weight.numel() * shared.weight.element_size() for shared in weights)
    packed_bytes = sum(state.encodings[shared.name].nbytes() for shared in weights)
    kind = "symmetric" if config.symmetric else "asymmetric"
    notes = [f"{len(weights)} weights stored as int{config.bits} codes, {config.granularity} {kind} scales"]
    notes += [
        f"{shared.name} is shared by {', '.join(shared.modules)}; quantized and stored once"
        for shared in weights
        if len(shared.modules) > 1
    ]
    metrics: dict[str, float | int | str] = {
        "modules_quantized": sum(len(shared.modules) for shared in weights),
        "tensors_quantized": len(weights),
        "params_quantized": sum(shared.weight.numel() for shared in weights),
        "original_bytes": original_bytes,
        "packed_bytes": packed_bytes,
        "packed_ratio": packed_bytes / original_bytes,
    }
    return StepReport(metrics=metrics, notes=notes)
