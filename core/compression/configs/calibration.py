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


class Reconstruction(BaseModel):
    """Block-wise reconstruction after a calibrated prune, decompose or gptq: within each transformer block, the
    weights of the compressed layers (the kept weights of pruned layers, pruned ones held at zero; both factors of
    factored layers; for gptq, a factor on each group's scale, codes and zero points fixed) are trained with Adam so
    that the block's outputs on its calibration inputs match the uncompressed model's outputs of that block. Needs
    only the calibration text, no labels; a block whose error would grow keeps its one-shot weights. The calibration
    windows become training text here: keep them apart from evaluation text.

    Example: `"reconstruct": {"epochs": 2, "lr": 3e-4}`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(default=2, ge=1, le=50, description="passes over the calibration windows per block")
    lr: float = Field(default=3e-4, gt=0, le=0.1, description="Adam learning rate")


class Reconstructing(Calibrated):
    """Base of the calibrated step configs that can train their compressed layers block by block afterwards."""

    reconstruct: Reconstruction | None = Field(
        default=None, description="block-wise reconstruction of the compressed layers after the one-shot step "
        "(off by default)"
    )
