"""The calibration block shared by every step that looks at activations (gptq, mixed, wanda, sparsegpt, structured
importance, asvd, svd_llm, ...): `"calibration": {"dataset_id": ..., "num_samples": N, "seq_len": L}`."""

from pydantic import BaseModel, ConfigDict, Field

from core.compression.configs.base import StepConfig


class CalibrationData(BaseModel):
    """Which text the activations come from, and how much of it.

    `dataset_id`: an uploaded dataset of the tenant, or null for the default corpus (Wikipedia articles shipped in
    gensim's test data; never the evaluation text). `num_samples` windows of `seq_len` tokens are cut from it,
    tokenized with the model's own tokenizer; `seed` fixes random fallbacks (no tokenizer, vision models).
    Example: `{"dataset_id": null, "num_samples": 32, "seq_len": 512}`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset_id: str | None = Field(default=None, min_length=1, max_length=128)
    num_samples: int = Field(default=32, ge=1, le=1024)
    seq_len: int = Field(default=512, ge=8, le=4096)
    seed: int = Field(default=0, ge=0)


class Calibrated(StepConfig):
    """Base of the step configs that take a `calibration` block."""

    calibration: CalibrationData = Field(default_factory=CalibrationData)
