"""Pruning step configs: `{"type": "prune", "method": ...}`."""

import re
from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

from core.compression.configs.base import COMPRESSED_TENSORS, GGUF, ONNX, StepConfig, Traits
from core.compression.configs.calibration import Calibrated, Reconstructing

_PATTERN = re.compile(r"^(\d{1,2}):(\d{1,2})$")
PRUNING = Traits(
    changes_weights=True, trains=False, packs_weights=False, quantizes_activations=False,
    before_packing="pruning must run before weight quantization (a packed weight cannot be pruned without losing its "
    "encoding); prune first, then quantize (Deep Compression's order)",
    after_weight_changes=None, exports={ONNX: None, COMPRESSED_TENSORS: None, GGUF: None}, streams_per_tensor=False,
    runs_by_block=False,
)


def nm_pattern(pattern: str) -> tuple[int, int] | None:
    """(N, M) for an "N:M" pattern (N of every M consecutive input weights are kept), None for "unstructured"."""
    match = _PATTERN.match(pattern)
    return None if match is None else (int(match[1]), int(match[2]))


class _Unstructured(StepConfig):
    """Fields of the element-wise pruning methods."""

    traits = PRUNING

    type: Literal["prune"] = "prune"
    sparsity: float = Field(default=0.5, gt=0, lt=1, description="fraction of the selected weights set to zero")
    pattern: str = Field(default="unstructured", description='"unstructured" or "N:M" such as "2:4"')
    include_embeddings: bool = Field(default=False, description="also prune nn.Embedding tables")

    @field_validator("pattern")
    @classmethod
    def _valid_pattern(cls, value: str) -> str:
        if value == "unstructured":
            return value
        nm = nm_pattern(value)
        if nm is None or not 0 < nm[0] < nm[1] <= 32:
            raise ValueError('must be "unstructured" or "N:M" with 0 < N < M <= 32, e.g. "2:4"')
        return value

    @model_validator(mode="after")
    def _sparsity_matches_pattern(self) -> Self:
        nm = nm_pattern(self.pattern)
        if nm is not None and "sparsity" in self.model_fields_set and abs(self.sparsity - (1 - nm[0] / nm[1])) > 1e-9:
            raise ValueError(f"sparsity {self.sparsity} contradicts pattern {self.pattern}; leave sparsity out")
        return self

    def nm(self) -> tuple[int, int] | None:
        return nm_pattern(self.pattern)


class PruneMagnitude(_Unstructured):
    """Unstructured (or N:M) magnitude pruning of `nn.Linear` and `nn.Conv2d` weights: the `sparsity` fraction with
    the smallest |w| is set to zero, chosen by exact rank (quantile), per layer or over all selected layers at once.

    Pruned weights are stored as a bitmask plus the kept values, so the file shrinks; dense kernels run no faster.

    Example: `{"type": "prune", "method": "magnitude", "sparsity": 0.5, "scope": "layer"}`
    """

    traits = PRUNING.by_block()

    method: Literal["magnitude"] = "magnitude"
    scope: Literal["layer", "global"] = "layer"


class PruneWanda(_Unstructured, Reconstructing):
    """Wanda (Sun et al. 2023): prune by |w| × ‖x‖ (weight times its input's norm over calibration tokens), compared
    within each output row, block by block so that each block sees its already-pruned predecessors.

    Example: `{"type": "prune", "method": "wanda", "sparsity": 0.5, "pattern": "2:4", "samples": 32}`
    """

    traits = PRUNING.by_block()

    method: Literal["wanda"] = "wanda"


class PruneSparseGPT(_Unstructured, Reconstructing):
    """SparseGPT (Frantar & Alistarh 2023): choose and prune weights column block by column block while updating
    the remaining ones to compensate, using the inverse Hessian X^T X of each layer's calibration inputs.

    Args: `block_size` columns solved together; `dampening` fraction of the mean Hessian diagonal added to it.
    Example: `{"type": "prune", "method": "sparsegpt", "sparsity": 0.5, "samples": 32, "tokens": 512}`
    """

    traits = PRUNING.by_block()

    method: Literal["sparsegpt"] = "sparsegpt"
    block_size: int = Field(default=128, ge=1, le=4096)
    dampening: float = Field(default=0.01, gt=0, lt=1)


class PruneStructured(Calibrated):
    """Structured pruning: physically removes attention heads, FFN neurons, conv channels or whole blocks, so the
    model gets smaller and faster with ordinary dense kernels.

    Args: `target` what to remove; `amount` fraction removed (per layer; of the blocks for "layers");
    `importance` how units are ranked: "l1" (weight magnitudes, no data), "activation" (calibration activations
    times outgoing weight norms; block influence 1 − cos(in, out) for layers), "taylor" (|activation × gradient|
    of the language-model loss, or of the output energy for models without an LM head).
    Example: `{"type": "prune", "method": "structured", "target": "neurons", "amount": 0.5, "importance": "l1"}`
    """

    traits = PRUNING.refusing(COMPRESSED_TENSORS, "structurally pruned layers have per-layer shapes that a "
                              "transformers config cannot describe; use magnitude, wanda or sparsegpt pruning")
    traits = traits.refusing(GGUF, "structurally pruned layers are recorded as rewrites of the model that GGUF's "
                             "llama hyperparameters cannot describe; use magnitude, wanda or sparsegpt pruning")

    type: Literal["prune"] = "prune"
    method: Literal["structured"] = "structured"
    target: Literal["heads", "neurons", "channels", "layers"] = "neurons"
    amount: float = Field(default=0.5, gt=0, lt=1)
    importance: Literal["l1", "taylor", "activation"] = "l1"


# Every config of this family; the first one's method is the default.
CONFIGS = (PruneMagnitude, PruneWanda, PruneSparseGPT, PruneStructured)
