"""Low-rank decomposition step configs: `{"type": "decompose", "method": ...}`."""

from typing import Literal, Self

from pydantic import Field, model_validator

from core.compression.configs.base import COMPRESSED_TENSORS, GGUF, ONNX, StepConfig, Traits
from core.compression.configs.calibration import Reconstructing

RANK_FIELDS = ("rank", "rank_ratio", "energy", "params_kept")
DECOMPOSITION = Traits(
    changes_weights=True, trains=False, packs_weights=False, quantizes_activations=False,
    before_packing="low-rank decomposition must run before weight quantization (factors of a packed weight would "
    "be float again); decompose first, then quantize",
    after_weight_changes=None,
    exports={ONNX: None, COMPRESSED_TENSORS: "low-rank factored layers (two Linears per weight) are not modules of a "
             "transformers architecture",
             GGUF: "low-rank factored layers (two Linears per weight) are not tensors of GGUF's llama architecture"},
    streams_per_tensor=False, runs_by_block=False,
)


class _Decompose(StepConfig):
    """How the rank of each factored layer is chosen: exactly one of the four fields."""

    traits = DECOMPOSITION

    type: Literal["decompose"] = "decompose"
    rank: int | None = Field(default=None, ge=1, le=1_000_000, description="the same rank for every layer")
    rank_ratio: float | None = Field(default=None, gt=0, le=1, description="fraction of each layer's full rank")
    energy: float | None = Field(default=None, gt=0, le=1, description="fraction of squared singular values kept")
    params_kept: float | None = Field(default=None, gt=0, lt=1, description="fraction of each layer's parameters")

    @model_validator(mode="after")
    def _one_rank_rule(self) -> Self:
        chosen = [name for name in RANK_FIELDS if getattr(self, name) is not None]
        if len(chosen) != 1:
            raise ValueError(f"set exactly one of {', '.join(RANK_FIELDS)} (got {chosen or 'none'})")
        return self


class DecomposeSVD(_Decompose):
    """Truncated SVD: each selected `nn.Linear` W (out × in) becomes two Linears, in → r → out; each `nn.Conv2d`
    (groups 1) becomes a k×1 conv into r channels followed by a 1×k conv (spatial SVD). A layer is factored only
    when the two factors have fewer parameters than the original.

    Example: `{"type": "decompose", "method": "svd", "params_kept": 0.8, "exclude": ["lm_head"]}`
    """

    traits = DECOMPOSITION.by_block()

    method: Literal["svd"] = "svd"


class DecomposeASVD(_Decompose, Reconstructing):
    """Activation-aware SVD (Yuan et al. 2023): columns of W are scaled by mean|x|^alpha of their calibration input
    before the SVD and unscaled after, so channels that carry large activations are approximated better.

    Example: `{"type": "decompose", "method": "asvd", "params_kept": 0.8, "alpha": 0.5}`
    """

    traits = DECOMPOSITION.by_block()

    method: Literal["asvd"] = "asvd"
    alpha: float = Field(default=0.5, gt=0, le=1)


class DecomposeSVDLLM(_Decompose, Reconstructing):
    """SVD-LLM (Wang et al. 2024): truncation-aware whitening. With S the Cholesky factor of the layer's input
    Gram matrix X^T X, the SVD of W·S is truncated and W ≈ (U Σ)(V^T S^-1), which minimises the error of the layer's
    outputs on the calibration inputs rather than of its weights.

    Example: `{"type": "decompose", "method": "svd_llm", "params_kept": 0.8, "samples": 32, "tokens": 512}`
    """

    traits = DECOMPOSITION.by_block()

    method: Literal["svd_llm"] = "svd_llm"
    dampening: float = Field(default=0.01, gt=0, lt=1, description="fraction of the mean diagonal added to X^T X")


# Every config of this family; the first one's method is the default.
CONFIGS = (DecomposeSVD, DecomposeASVD, DecomposeSVDLLM)
