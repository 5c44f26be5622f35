"""Which recipes an export format can represent, checked at submission (JobSpec validation): a recipe whose
artifact an export cannot write is refused with the reason, instead of failing (or silently losing a step) at the
end of the job. Each config answers for every format through its traits (`StepConfig.export_refusal`).
"""

from collections.abc import Sequence

from core.compression.configs.base import (
    COMPRESSED_TENSORS,
    EXPORT_FORMATS,
    GGUF,
    ONNX,
    ExportFormat,
    StepConfig,
)

__all__ = ["COMPRESSED_TENSORS", "EXPORT_FORMATS", "GGUF", "GGUF_ARCHITECTURES", "GGUF_BLOCK", "ONNX", "check_exports",
           "gguf_grid_refusal", "model_export_refusal"]

GGUF_BLOCK = 32  # weights per block, each with one float16 scale, in every GGUF type our codes go into
GGUF_WIDTHS = (4, 5, 8)  # Q4_0/Q4_1, Q5_0/Q5_1, Q8_0
GGUF_ARCHITECTURES = ("LlamaForCausalLM",)  # written as GGUF's `llama` architecture, as llama.cpp's converter does


def check_exports(steps: Sequence[StepConfig], export: Sequence[ExportFormat]) -> None:
    """Raise ValueError naming the first step that an export format in `export` cannot represent, and why."""
    for fmt in export:
        for index, step in enumerate(steps):
            reason = step.export_refusal(fmt)
            if reason is not None:
                raise ValueError(f'export "{fmt}" cannot represent step {index} ({step.tag()}): {reason}')


def model_export_refusal(export: Sequence[str], architecture: str) -> str | None:
    """Why an export format in `export` cannot write a model of class `architecture` (what submission knows of an
    uploaded model), or None. Only GGUF depends on the model: it writes Llama-family causal LMs.

    Example: `model_export_refusal(["gguf"], "BertModel")` names the architectures GGUF export writes.
    """
    if GGUF in export and architecture not in GGUF_ARCHITECTURES:
        return (f'export "gguf" writes Llama-family causal LMs ({", ".join(GGUF_ARCHITECTURES)}), not {architecture}')
    return None


def gguf_grid_refusal(bits: int | Sequence[int], granularity: str, group_size: int | None,
                      symmetric: bool) -> str | None:
    """Why GGUF's block types cannot carry the codes of this integer grid exactly, naming the grid to use; None when
    they can. Each GGUF block is 32 consecutive input weights with one float16 scale, which is our `per_group`
    grid with `group_size: 32`: 8-bit symmetric codes go to Q8_0, 4-bit to Q4_0 (asymmetric Q4_1), 5-bit to Q5_0
    (asymmetric Q5_1). `bits` is one width or, for mixed precision, every width a layer may get.

    Example: `gguf_grid_refusal(4, "per_group", 128, True)` names `group_size: 32`.
    """
    if granularity != "per_group" or group_size != GGUF_BLOCK:
        grid = f"group_size {group_size}" if granularity == "per_group" else f"granularity {granularity}"
        return (f"GGUF stores one float16 scale per block of {GGUF_BLOCK} input weights, not {grid}; use "
                f"granularity: per_group, group_size: {GGUF_BLOCK} (in GGUF it takes the same bytes as a coarser "
                "grid and is more accurate)")
    for width in [bits] if isinstance(bits, int) else bits:
        if width not in GGUF_WIDTHS:
            return (f"GGUF has no block type for {width}-bit codes with one scale per {GGUF_BLOCK} weights; use "
                    "bits: 4 (Q4_0, asymmetric Q4_1), 5 (Q5_0, asymmetric Q5_1) or 8 (Q8_0)")
        if width == 8 and not symmetric:
            return ("8-bit codes minus their zero points take 9 bits, more than Q8_0 holds; use symmetric: true for "
                    "bits 8")
    return None
