"""Knowledge distillation step config: `{"type": "distill", ...}`."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from core.compression.configs.training import DistillLoss, TrainingStep


class StudentLayers(BaseModel):
    """A shallower student: keep `layers` of the model's transformer layers (evenly spaced, the last one kept)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: int = Field(ge=1, le=256)


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
