"""Compression recipes: one pydantic config per step method, a discriminated union on `type`.

The same JSON is accepted everywhere (REST body, CLI file, tests, docs). Configs are pure data, no torch: the API
validates a recipe without loading a model, and every bad field is reported at once as a 422.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Pattern = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class StepConfig(BaseModel):
    """Base of every step config: unknown fields are errors, configs are immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    targets: list[Pattern] = Field(
        default_factory=lambda: ["*"],
        max_length=64,
        description="fnmatch patterns on module names to compress (default: every supported module).",
    )
    exclude: list[Pattern] = Field(
        default_factory=list, max_length=64, description="fnmatch patterns on module names to leave untouched."
    )


class QuantizeRTN(StepConfig):
    """Round-to-nearest weight-only quantization of `nn.Linear` and `nn.Embedding` weights.

    q = clamp(round(w / scale) + zero_point) with one scale (and zero point when asymmetric) per output channel
    or per tensor; stored packed as int8 plus scales, so the file really shrinks.

    Example: `{"type": "quantize", "method": "rtn", "bits": 8, "granularity": "per_channel", "symmetric": true}`
    """

    type: Literal["quantize"]
    method: Literal["rtn"] = "rtn"
    bits: Literal[8] = 8
    granularity: Literal["per_tensor", "per_channel"] = "per_channel"
    symmetric: bool = True
    include_embeddings: bool = True


StepSpec = Annotated[QuantizeRTN, Field(discriminator="type")]


class JobSpec(BaseModel):
    """What a job runs: an ordered list of steps applied to one uploaded model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: list[StepSpec] = Field(min_length=1, max_length=32)
