"""The base of every step config, its traits (what the ordering, export and submission rules know about a step),
and helpers for families with several methods."""

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Pattern = Annotated[str, StringConstraints(min_length=1, max_length=256)]
MAX_PATTERNS = 1024

ExportFormat = Literal["onnx", "compressed-tensors", "gguf"]
ONNX: ExportFormat = "onnx"
COMPRESSED_TENSORS: ExportFormat = "compressed-tensors"
GGUF: ExportFormat = "gguf"
EXPORT_FORMATS: tuple[ExportFormat, ...] = get_args(ExportFormat)


@dataclass(frozen=True)
class Traits:
    """What the rules need to know about a step, declared once per family (or config) as its `traits` and read by
    `core.compression.order`, `core.compression.export_rules` and job submission; never inferred from its name.
    Every field must be given, so a new config cannot be filed under a rule by omission.

    changes_weights: the step changes weight values (every step but encode).
    trains: the step trains on a dataset (distill, lora): submission wants held-out rows, int8 kernels cannot train.
    packs_weights: the step stores weights as quantization codes, a codebook or fp8.
    quantizes_activations: the step swaps layers for int8 inference kernels (W8A8).
    before_packing: why the step must run before weight quantization (it recomputes weights from their float
        values, so a packed encoding would be lost), or None.
    after_weight_changes: why every step that changes weights must come before this one, or None.
    exports: each export format mapped to None (it can hold what the step produces) or to why it cannot.
    streams_per_tensor: the step encodes each weight from that weight alone, without data or the rest of the model
        (rtn, fp8), so `core.compression.sequential` can run it block by block on a model larger than memory.
    runs_by_block: the step's handler visits the transformer blocks one at a time, through the block runners
        (calibrated gptq, wanda, sparsegpt, asvd, svd_llm) or `state.each_in_memory` (rtn, fp8, kmeans, magnitude
        pruning, svd), so `core.compression.offload` can hold one block in memory while it runs.

    Example: `Traits(changes_weights=True, trains=False, packs_weights=True, quantizes_activations=False,
    before_packing=None, after_weight_changes=None, exports={"onnx": None, "compressed-tensors": None, "gguf": None},
    streams_per_tensor=False, runs_by_block=False)`
    """

    changes_weights: bool
    trains: bool
    packs_weights: bool
    quantizes_activations: bool
    before_packing: str | None
    after_weight_changes: str | None
    exports: Mapping[ExportFormat, str | None]
    streams_per_tensor: bool
    runs_by_block: bool

    def __post_init__(self) -> None:
        if set(self.exports) != set(EXPORT_FORMATS):
            raise TypeError(f"traits must answer every export format {EXPORT_FORMATS}, not {tuple(self.exports)}")

    def refusing(self, fmt: ExportFormat, reason: str) -> "Traits":
        """These traits, except that `fmt` cannot represent the step, because of `reason`."""
        return dataclasses.replace(self, exports={**self.exports, fmt: reason})

    def streaming(self) -> "Traits":
        """These traits, for a config whose weights are encoded one tensor at a time with no data."""
        return dataclasses.replace(self, streams_per_tensor=True)

    def by_block(self) -> "Traits":
        """These traits, for a config whose handler visits the transformer blocks one at a time through the block
        runners (`sparsity.blockwise.sequential_blocks`) or `core.compression.state.each_in_memory`, touching
        only the weights of the block it is in."""
        return dataclasses.replace(self, runs_by_block=True)


class StepConfig(BaseModel):
    """Base of every step config: unknown fields are errors, configs are immutable once validated.

    Each config declares `type` (and, in a family with several methods, `method`) as a Literal field whose default
    is its one value, and inherits or sets `traits`. Instance-dependent answers (an export that depends on a
    field) override `export_refusal` or `weight_changes_refusal`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    if TYPE_CHECKING:
        # Declared for the type checker only: at run time a base annotation would move each config's own `type`
        # field ahead of its other fields, changing the key order of every dumped recipe.
        type: str

    traits: ClassVar[Traits]

    # Up to 1024 entries: plain module names are patterns too, and a search keeps its most sensitive Linears at
    # higher precision by listing them (30% of SmolLM2's 210 is 63 names; of a 70 B Llama's 560, 168).
    targets: list[Pattern] = Field(
        default_factory=lambda: ["*"],
        max_length=MAX_PATTERNS,
        description="fnmatch patterns on module names to compress (default: every supported module).",
    )
    exclude: list[Pattern] = Field(
        default_factory=list, max_length=MAX_PATTERNS,
        description="fnmatch patterns on module names to leave untouched.",
    )

    @classmethod
    def tag(cls) -> str:
        """How recipes, errors and reports name the config: `quantize:rtn`, or `distill` for a family with one
        config and no `method`."""
        method = declared(cls, "method")
        return f"{declared(cls, 'type')}:{method}" if method else str(declared(cls, "type"))

    def export_refusal(self, fmt: ExportFormat) -> str | None:
        """Why export `fmt` cannot represent what this step produces, or None when it can."""
        return self.traits.exports[fmt]

    def weight_changes_refusal(self) -> str | None:
        """Why no step that changes weights may follow this one, or None when any may."""
        return self.traits.after_weight_changes


def declared(config: type[StepConfig], field: str) -> str | None:
    """The value a config's `type` or `method` Literal field is fixed to; None when it has no such field."""
    info = config.model_fields.get(field)
    return None if info is None else info.default
