"""Which recipes an export format can represent, checked at submission (JobSpec validation): a recipe whose
artifact an export cannot write is refused with the reason, instead of failing (or silently losing a step) at the
end of the job.
"""

from collections.abc import Callable, Sequence

from core.compression.configs.base import StepConfig

ONNX = "onnx"
COMPRESSED_TENSORS = "compressed-tensors"
EXPORT_FORMATS = (ONNX, COMPRESSED_TENSORS)

Refusal = Callable[[StepConfig], str | None]


def _compressed_tensors_refusal(step: StepConfig) -> str | None:
    """Why compressed-tensors cannot hold what `step` produces, or None when it can."""
    method = getattr(step, "method", None)
    if step.type == "quantize" and method == "kmeans":
        return ("a k-means codebook has no compressed-tensors format (it stores integer grids and fp8); "
                "use rtn, gptq or mixed")
    if step.type == "quantize" and method in ("dynamic", "static", "smoothquant"):
        return ("int8-activation (W8A8) modules are not exported to compressed-tensors; use a weight-only method "
                '(rtn, gptq, mixed, fp8) or export "onnx"')
    if step.type == "quantize" and method == "mixed" and getattr(step, "symmetric", True) is False:
        return ("per-layer widths with asymmetric zero points do not load in transformers (its dequantizing path "
                "applies one scheme to every layer, its default path cannot place packed zero points); use "
                "symmetric: true")
    if step.type == "prune" and method == "structured":
        return ("structurally pruned layers have per-layer shapes that a transformers config cannot describe; "
                "use magnitude, wanda or sparsegpt pruning")
    if step.type == "decompose":
        return "low-rank factored layers (two Linears per weight) are not modules of a transformers architecture"
    if step.type == "encode":
        return ("entropy-coded weights have no compressed-tensors format; drop the encode step (the quantized codes "
                "are exported as they are)")
    if step.type == "lora" and getattr(step, "merge", True) is False:
        return "unmerged LoRA adapters are not part of a transformers architecture; use merge: true"
    return None


_REFUSALS: dict[str, Refusal] = {COMPRESSED_TENSORS: _compressed_tensors_refusal}


def check_exports(steps: Sequence[StepConfig], export: Sequence[str]) -> None:
    """Raise ValueError naming the first step that an export format in `export` cannot represent, and why."""
    for fmt in export:
        refusal = _REFUSALS.get(fmt)
        for index, step in enumerate(steps if refusal else ()):
            reason = refusal(step)
            if reason is not None:
                method = getattr(step, "method", None)
                name = f"{step.type}:{method}" if method else step.type
                raise ValueError(f'export "{fmt}" cannot represent step {index} ({name}): {reason}')
