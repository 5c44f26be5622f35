"""The base of every step config, and helpers for families with several methods."""

from typing import Annotated

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
