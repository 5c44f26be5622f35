"""Knowledge distillation step config: `{"type": "distill", ...}`."""

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.compression.configs.training import DistillLoss, TrainingStep


class StudentLayers(BaseModel):
    """A shallower student: keep `layers` of the model's transformer layers, or a `fraction` of them (rounded, at
    least one: `{"fraction": 0.5}` keeps 3 of MiniLM's 6 and 15 of SmolLM2's 30), evenly spaced, the last one kept.
    Give exactly one of the two."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: int | None = Field(None, ge=1, le=256)
    fraction: float | None = Field(None, gt=0, lt=1)

    @model_validator(mode="after")
    def _layers_or_fraction(self) -> Self:
        if (self.layers is None) == (self.fraction is None):
            raise ValueError("student: give either layers or fraction")
        return self

    def count(self, total: int) -> int:
        """How many of the model's `total` layers the student keeps."""
        return self.layers if self.layers is not None else max(1, round(total * (self.fraction or 0)))


class Distill(TrainingStep):
    """Train the model of the previous steps (`student: "self"`) or a shallower copy of it (`{"layers": k}`)
    to reproduce the teacher's outputs on the dataset's text, in place.

    Encoders learn the teacher's hidden states (no labels needed), causal LMs its token distributions. Weights that
    are exactly zero when the step starts (pruned) stay exactly zero; rtn-quantized weights train through
    straight-through fake quantization and k-means ones train their shared centroids, so every encoding still
    holds afterwards. Modules selected by `targets`/`exclude` train; embeddings only with `train_embeddings`.

    Example: `{"type": "distill", "dataset_id": "dst_...", "student": "self", "max_steps": 300, "lr": 1e-4,
    "batch_size": 16, "seq_len": 128, "loss": {"hidden_mse": 1.0}}`
    """

    type: Literal["distill"] = "distill"
    student: Literal["self"] | StudentLayers = "self"
    train_embeddings: bool = False


# Every config of this family; `core.compression.spec` tags it `distill`.
CONFIGS = (Distill,)

__all__ = ["CONFIGS", "Distill", "DistillLoss", "StudentLayers"]
