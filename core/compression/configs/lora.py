"""LoRA recovery step config: `{"type": "lora", ...}`."""

from typing import Literal

from pydantic import AliasChoices, Field

from core.compression.configs.base import COMPRESSED_TENSORS, GGUF, ExportFormat, Pattern
from core.compression.configs.training import TrainingStep


class LoRA(TrainingStep):
    """Parameter-efficient recovery: low-rank adapters (peft LoRA) on the selected `nn.Linear` modules train while
    every original weight stays frozen, so pruning masks and quantized weights are untouched during training.

    objective: "distill" (match the teacher, like the distill step) or "task" (next-token loss; causal LMs only).
    merge: true folds the adapters into the weights, then re-applies the pruning masks (exactly) and re-encodes
        quantized weights; false keeps the adapters beside the frozen weights in the artifact (recorded as a
        structural rewrite, so `load_compressed` rebuilds them).
    targets (alias `target_modules`) / exclude: fnmatch patterns on module names.

    Example: `{"type": "lora", "dataset_id": "dst_...", "rank": 8, "alpha": 16, "objective": "distill",
    "merge": true, "target_modules": ["*.q_proj", "*.v_proj"]}`
    """

    type: Literal["lora"] = "lora"
    targets: list[Pattern] = Field(
        default_factory=lambda: ["*"],
        max_length=64,
        validation_alias=AliasChoices("targets", "target_modules"),
        description="fnmatch patterns on module names that get adapters (nn.Linear only).",
    )
    exclude: list[Pattern] = Field(
        default_factory=lambda: ["lm_head", "*pooler*"],
        max_length=64,
        description="fnmatch patterns on module names left without adapters.",
    )
    rank: int = Field(8, ge=1, le=256)
    alpha: float = Field(16.0, gt=0, le=4096)
    dropout: float = Field(0.0, ge=0, lt=1)
    objective: Literal["distill", "task"] = "distill"
    merge: bool = True
    lr: float = Field(1e-3, gt=0, le=1)

    def export_refusal(self, fmt: ExportFormat) -> str | None:
        if fmt == COMPRESSED_TENSORS and not self.merge:
            return "unmerged LoRA adapters are not part of a transformers architecture; use merge: true"
        if fmt == GGUF and not self.merge:
            return "unmerged LoRA adapters are not tensors of GGUF's llama architecture; use merge: true"
        return super().export_refusal(fmt)

    def weight_changes_refusal(self) -> str | None:
        if not self.merge:
            return ("lora with merge: false keeps its adapters beside frozen weights, so no step that changes "
                    "weights may follow it; put it last or use merge: true")
        return super().weight_changes_refusal()


# Every config of this family; `core.compression.spec` tags it `lora`.
CONFIGS = (LoRA,)

__all__ = ["CONFIGS", "LoRA"]
