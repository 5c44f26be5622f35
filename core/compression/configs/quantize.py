"""Quantization step configs: `{"type": "quantize", "method": ...}`."""

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.compression.configs.base import COMPRESSED_TENSORS, GGUF, ONNX, ExportFormat, StepConfig, Traits
from core.compression.configs.calibration import CalibrationData, Reconstructing
from core.compression.export_rules import gguf_grid_refusal

# Weight-only methods: weights become integer codes, a k-means codebook or fp8; activations stay float.
WEIGHT_ONLY = Traits(changes_weights=True, trains=False, packs_weights=True, quantizes_activations=False,
                     before_packing=None, after_weight_changes=None,
                     exports={ONNX: None, COMPRESSED_TENSORS: None,
                              GGUF: "GGUF's block types hold integer grids only (rtn, gptq or mixed with granularity: "
                                    "per_group, group_size: 32)"},
                     streams_per_tensor=False, runs_by_block=False)
# W8A8 methods: Linears become int8 inference modules (int8 x int8 GEMMs, which cannot train).
INT8_ACTIVATIONS = Traits(
    changes_weights=True, trains=False, packs_weights=False, quantizes_activations=True, before_packing=None,
    after_weight_changes=None,
    exports={ONNX: None, COMPRESSED_TENSORS: "int8-activation (W8A8) modules are not exported to compressed-tensors; "
             'use a weight-only method (rtn, gptq, mixed, fp8) or export "onnx"',
             GGUF: "int8-activation (W8A8) modules have no GGUF tensors (llama.cpp quantizes activations itself); "
             "use rtn or gptq with bits: 8, granularity: per_group, group_size: 32 (Q8_0)"},
    streams_per_tensor=False, runs_by_block=False,
)

GroupSize = Field(default=None, ge=8, le=8192, description="columns sharing one scale when per_group")


class _IntGridFields(StepConfig):
    """Integer grid fields shared by rtn, gptq and mixed: granularity, group size, symmetry, embeddings."""

    traits = WEIGHT_ONLY
    if TYPE_CHECKING:  # each method declares its code width(s): one (rtn, gptq) or several (mixed)
        bits: int | list[int]

    granularity: Literal["per_tensor", "per_channel", "per_group"] = "per_channel"
    group_size: int | None = GroupSize
    symmetric: bool = True
    include_embeddings: bool = True

    @model_validator(mode="after")
    def _group_size_matches_granularity(self) -> "_IntGridFields":
        if self.granularity == "per_group" and self.group_size is None:
            raise ValueError("group_size is required when granularity is per_group")
        if self.granularity != "per_group" and "group_size" in self.model_fields_set and self.group_size is not None:
            raise ValueError(f"group_size only applies to granularity per_group, not {self.granularity}")
        return self

    def export_refusal(self, fmt: ExportFormat) -> str | None:
        if fmt == GGUF:
            return gguf_grid_refusal(self.bits, self.granularity, self.columns_per_scale, self.symmetric)
        return super().export_refusal(fmt)

    @property
    def columns_per_scale(self) -> int | None:
        """The group size in effect: None unless per_group (a default group size is ignored per channel)."""
        return self.group_size if self.granularity == "per_group" else None


class QuantizeRTN(_IntGridFields):
    """Round-to-nearest weight-only quantization of `nn.Linear` and `nn.Embedding` weights.

    q = clamp(round(w / scale) + zero_point) with one scale (and integer zero point when asymmetric) per tensor,
    output channel, or group of `group_size` input columns. 8 bits per channel or tensor is stored as int8 codes
    plus float32 scales; fewer bits or groups as bit-packed codes (two int4 per byte) plus float16 scales.

    Example: `{"type": "quantize", "method": "rtn", "bits": 4, "granularity": "per_group", "group_size": 64}`
    """

    traits = WEIGHT_ONLY.streaming().by_block()

    type: Literal["quantize"] = "quantize"
    method: Literal["rtn"] = "rtn"
    bits: int = Field(default=8, ge=2, le=8, description="code width in bits (2-8)")


class QuantizeKMeans(StepConfig):
    """Weight sharing: each weight is replaced by the nearest of 2**bits centroids (1-D k-means, Lloyd iterations
    from quantile seeds), one codebook per output row (`per_channel`), per input column (`per_column`) or per tensor;
    stored as bit-packed indices plus a float16 codebook.

    Example: `{"type": "quantize", "method": "kmeans", "bits": 4, "granularity": "per_channel"}`
    """

    traits = WEIGHT_ONLY.refusing(COMPRESSED_TENSORS, "a k-means codebook has no compressed-tensors format (it "
                                  "stores integer grids and fp8); use rtn, gptq or mixed").refusing(
        GGUF, "a k-means codebook has no GGUF type (GGUF's blocks are integer grids with one scale per 32 weights); "
        "use rtn or gptq with granularity: per_group, group_size: 32").by_block()

    type: Literal["quantize"] = "quantize"
    method: Literal["kmeans"] = "kmeans"
    bits: int = Field(default=4, ge=2, le=8, description="log2 of the number of centroids (2-8)")
    granularity: Literal["per_tensor", "per_channel", "per_column"] = Field(
        default="per_channel", description="one codebook per output row, per input column (for an embedding table: "
        "per hidden dimension) or per tensor")
    iterations: int = Field(default=20, ge=1, le=100)
    include_embeddings: bool = True


class QuantizeGPTQ(_IntGridFields, Reconstructing):
    """GPTQ: quantizes each Linear column by column on an integer grid and spreads each column's rounding error over
    the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs on calibration data.
    Transformer blocks are processed one at a time on the outputs of the already quantized blocks. Embeddings and
    Linear layers outside the blocks (e.g. lm_head, pooler) get round-to-nearest on the same grid.

    Example: `{"type": "quantize", "method": "gptq", "bits": 4, "granularity": "per_group", "group_size": 128,
    "calibration": {"num_samples": 32, "seq_len": 512}}`
    """

    traits = WEIGHT_ONLY.by_block()

    type: Literal["quantize"] = "quantize"
    method: Literal["gptq"] = "gptq"
    bits: int = Field(default=4, ge=2, le=8, description="code width in bits (2-8)")
    granularity: Literal["per_tensor", "per_channel", "per_group"] = "per_group"
    group_size: int | None = Field(default=128, ge=8, le=8192, description="columns sharing one scale")
    dampening: float = Field(default=0.01, gt=0, le=1, description="added to the Hessian diagonal, x its mean")
    block_columns: int = Field(default=128, ge=8, le=4096, description="columns updated together (speed only)")
    act_order: bool = Field(default=True, description="quantize columns with the largest activations first")
    clip_search: bool = Field(
        default=True, description="shrink each group's range where that lowers its activation-weighted error"
    )
    refit_rounds: int = Field(
        default=0, ge=0, le=4, description="rounds of re-solving each row's scales for the codes GPTQ chose (least "
        "squares in the input Hessian; same format, lower output error), each round after the first re-running "
        "GPTQ on the refitted scales: 2 cut SmolLM2's layer error 3-7% for twice GPTQ's time"
    )
    full_range: bool = Field(
        default=False, description="symmetric codes use all 2**bits levels: each group's largest-magnitude weight "
        "lands exactly on the lowest code, its scale taking that weight's sign (llama.cpp's Q4_0 rounding: one "
        "level more than max|w| / (2**(bits-1) - 1)); symmetric only")

    @model_validator(mode="after")
    def _full_range_is_symmetric(self) -> "QuantizeGPTQ":
        if self.full_range and not self.symmetric:
            raise ValueError("full_range applies to symmetric grids only (symmetric: true)")
        return self


class QuantizeFP8(StepConfig):
    """float8 e4m3 weight-only quantization: w ≈ fp8(w / scale) · scale, scale = max|w| / 448 per output row or
    per tensor; stored as float8_e4m3fn codes plus float32 scales.

    Example: `{"type": "quantize", "method": "fp8", "granularity": "per_channel"}`
    """

    traits = WEIGHT_ONLY.streaming().by_block()

    type: Literal["quantize"] = "quantize"
    method: Literal["fp8"] = "fp8"
    granularity: Literal["per_tensor", "per_channel"] = "per_channel"
    include_embeddings: bool = True


class MixedBudget(BaseModel):
    """The size budget of mixed precision: mean code bits per quantized weight."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    avg_bits: float = Field(ge=2, le=8)


class QuantizeMixed(_IntGridFields):
    """Mixed-precision round-to-nearest: a sensitivity scan quantizes each weight alone at each candidate width and
    measures how far the model's outputs on calibration data move (1 - cosine vs the float model); then widths are
    raised greedily where they buy the most sensitivity per extra bit, until `budget.avg_bits` is spent.

    Example: `{"type": "quantize", "method": "mixed", "bits": [4, 8], "budget": {"avg_bits": 5.0},
    "granularity": "per_group", "group_size": 64}`
    """

    traits = WEIGHT_ONLY.by_block()

    type: Literal["quantize"] = "quantize"
    method: Literal["mixed"] = "mixed"
    bits: list[Annotated[int, Field(ge=2, le=8)]] = Field(default_factory=lambda: [4, 8], min_length=2, max_length=7)
    budget: MixedBudget = Field(default_factory=lambda: MixedBudget(avg_bits=5.0))
    calibration: CalibrationData = Field(
        default_factory=lambda: CalibrationData(num_samples=8, seq_len=128),
    )

    @field_validator("bits")
    @classmethod
    def _distinct_widths(cls, bits: list[int]) -> list[int]:
        if len(set(bits)) != len(bits):
            raise ValueError("bits must be distinct code widths")
        return sorted(bits)

    @model_validator(mode="after")
    def _budget_is_reachable(self) -> "QuantizeMixed":
        if not self.bits[0] <= self.budget.avg_bits <= self.bits[-1]:
            raise ValueError(f"budget.avg_bits must lie between {self.bits[0]} and {self.bits[-1]} (the bits given)")
        return self

    def export_refusal(self, fmt: ExportFormat) -> str | None:
        if fmt == COMPRESSED_TENSORS and not self.symmetric:
            return ("per-layer widths with asymmetric zero points do not load in transformers (its dequantizing "
                    "path applies one scheme to every layer, its default path cannot place packed zero points); "
                    "use symmetric: true")
        return super().export_refusal(fmt)


ActivationObserver = Literal["minmax", "percentile", "mse", "histogram"]


class _Int8ActivationFields(StepConfig):
    """Fields shared by the W8A8 methods (dynamic, static, smoothquant): int8 weights, uint8 activations, both
    executed by torch's x86 (fbgemm) int8 GEMM. Only `nn.Linear` modules are converted; a Linear whose weight is
    tied to another module (e.g. lm_head sharing the embedding) stays float."""

    traits = INT8_ACTIVATIONS.by_block()

    granularity: Literal["per_tensor", "per_channel"] = Field(
        default="per_channel", description="one weight scale per output channel, or one per tensor"
    )
    reduce_range: bool | None = Field(
        default=None,
        description="7-bit activations, for CPUs without VNNI (fbgemm sums u8 x s8 pairs in saturating int16). "
        "Default: off for dynamic (each input's own range); for static ranges, on when the quantizing CPU lacks VNNI. "
        "Set true for a static artifact that must also run correctly on such CPUs.",
    )

    def static_reduce_range(self) -> bool:
        """Whether calibrated (static) activation ranges use 7 bits."""
        if self.reduce_range is not None:
            return self.reduce_range
        from core.compression.int8.cpu import cpu_has_vnni  # configs stay torch-free: the API imports them

        return not cpu_has_vnni()


class QuantizeDynamic(_Int8ActivationFields):
    """int8 weights and dynamically quantized int8 activations for `nn.Linear`: each input is quantized per tensor
    from its own range at run time, and the GEMM runs in int8. The method for CPU speed; no calibration data.

    Example: `{"type": "quantize", "method": "dynamic", "granularity": "per_channel", "exclude": ["pooler.*"]}`
    """

    type: Literal["quantize"] = "quantize"
    method: Literal["dynamic"] = "dynamic"


class _CalibratedInt8Fields(_Int8ActivationFields):
    """Calibration text and, for static activation ranges, the observer that turns what it saw into a range."""

    observer: ActivationObserver = Field(
        default="mse", description="how a static activation range is chosen from calibration data"
    )
    percentile: float = Field(
        default=99.99, ge=90, le=100, description="percent of calibration values kept inside the range (percentile)"
    )
    bins: int = Field(default=2048, ge=256, le=16384, description="histogram bins (percentile, mse, histogram)")
    calibration: CalibrationData = Field(default_factory=lambda: CalibrationData(num_samples=16, seq_len=256))

    @model_validator(mode="after")
    def _percentile_needs_its_observer(self) -> "_CalibratedInt8Fields":
        if "percentile" in self.model_fields_set and self.observer != "percentile":
            raise ValueError(f"percentile only applies to observer percentile, not {self.observer}")
        return self


class QuantizeStatic(_CalibratedInt8Fields):
    """Post-training static quantization of `nn.Linear`: int8 weights, and int8 activations whose per-tensor range
    is fixed beforehand from calibration text by an observer: `minmax` (exact range), `percentile` (clips the
    outer tails), `mse` (the clipping that minimises the quantization error), `histogram` (minimum KL divergence,
    TensorRT-style entropy calibration).

    Example: `{"type": "quantize", "method": "static", "observer": "percentile", "percentile": 99.99,
    "calibration": {"num_samples": 16, "seq_len": 256}}`
    """

    type: Literal["quantize"] = "quantize"
    method: Literal["static"] = "static"


class QuantizeSmoothQuant(_CalibratedInt8Fields):
    """SmoothQuant W8A8: per input channel, s = max|X|^alpha / max|W|^(1 - alpha) moves activation outliers into
    the weights (X / s, W · s), then every selected Linear runs int8 x int8 like `dynamic` (or `static`). 1/s is
    folded into the preceding norm or Linear where the model allows it (Llama-style pre-norm blocks: norms before
    q/k/v and gate/up, v_proj before o_proj, up_proj before down_proj); elsewhere, if `runtime_smoothing`, the
    int8 module multiplies its input by 1/s (one extra elementwise op), else that Linear is not smoothed.

    Example: `{"type": "quantize", "method": "smoothquant", "alpha": 0.75, "activations": "dynamic",
    "calibration": {"num_samples": 16, "seq_len": 256}}`
    """

    type: Literal["quantize"] = "quantize"
    method: Literal["smoothquant"] = "smoothquant"
    alpha: float = Field(default=0.75, ge=0, le=1, description="migration strength towards the weights")
    activations: Literal["dynamic", "static"] = Field(
        default="dynamic", description="activation ranges per input at run time, or calibrated once (observer)"
    )
    runtime_smoothing: bool = Field(
        default=True, description="smooth Linears whose input cannot be folded into a preceding layer at run time"
    )


# Every config of this family; `core.compression.spec` tags each one `quantize:<method>`.
CONFIGS: tuple[type[StepConfig], ...] = (QuantizeRTN, QuantizeKMeans, QuantizeGPTQ, QuantizeFP8, QuantizeMixed)
CONFIGS += (QuantizeDynamic, QuantizeStatic, QuantizeSmoothQuant)  # W8A8: int8 activations too
