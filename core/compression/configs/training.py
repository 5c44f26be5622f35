"""Fields shared by the training steps (distill, lora): data, teacher, schedule, checkpoints."""

from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from core.compression.configs.base import COMPRESSED_TENSORS, GGUF, ONNX, StepConfig, Traits

ResourceId = Annotated[str, StringConstraints(min_length=1, max_length=64)]
DEFAULT_MAX_STEPS = 200


class DistillLoss(BaseModel):
    """Weights of the distillation objectives; at least one must be positive.

    logits_kl: KL divergence of the student's from the teacher's softened token distributions (causal LMs).
    hidden_mse: squared error of hidden states relative to the teacher's, at the layers `hidden_layers` names.
    hidden_layers: "all" (every mapped layer, the output counted twice) or "last" (the model's output only).
    embedding: 1 − cosine of the sentence embeddings (mean of the last hidden state over real tokens), the number
        encoders are judged by.
    attention: mean squared error of attention probabilities (slower: needs eager attention).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    logits_kl: float = Field(0.0, ge=0, le=100)
    hidden_mse: float = Field(0.0, ge=0, le=100)
    hidden_layers: Literal["all", "last"] = "all"
    embedding: float = Field(0.0, ge=0, le=100)
    attention: float = Field(0.0, ge=0, le=100)

    @model_validator(mode="after")
    def _some_weight(self) -> Self:
        if self.logits_kl + self.hidden_mse + self.embedding + self.attention <= 0:
            raise ValueError("at least one of logits_kl, hidden_mse, embedding, attention must be positive")
        return self


class TrainingStep(StepConfig):
    """Base of the training steps. Texts come from `dataset_id` (the default corpus when omitted); a share of the
    rows (`eval_fraction`) is held out for evaluation and never trained on. Train for `max_steps` optimizer steps
    or for `epochs` passes over the training windows (give one of them). A checkpoint is written every
    `checkpoint_every` steps, so a restarted job resumes from the last one."""

    traits = Traits(changes_weights=True, trains=True, packs_weights=False, quantizes_activations=False,
                    before_packing=None, after_weight_changes=None,
                    exports={ONNX: None, COMPRESSED_TENSORS: None, GGUF: None},
                    streams_per_tensor=False, runs_by_block=False)

    dataset_id: ResourceId | None = None
    teacher: ResourceId = Field("original", description='"original" (the uploaded model) or a model id of yours')
    max_steps: int = Field(DEFAULT_MAX_STEPS, ge=1, le=100_000)
    epochs: float | None = Field(None, gt=0, le=100)
    lr: float = Field(1e-4, gt=0, le=1)
    batch_size: int = Field(8, ge=1, le=512)
    seq_len: int = Field(128, ge=8, le=8192)
    eval_fraction: float = Field(0.1, gt=0, le=0.5)
    checkpoint_every: int = Field(50, ge=1, le=100_000)
    temperature: float = Field(2.0, gt=0, le=20)
    loss: DistillLoss | None = Field(None, description="default: logits_kl for causal LMs, hidden_mse otherwise")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: mixed precision (matmuls in bfloat16 under autocast; weights, optimizer state and "
                            "the held-out evaluation stay fp32); faster on GPUs and on CPUs with AVX512-BF16 or AMX")

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> Self:
        if self.epochs is not None and "max_steps" in self.model_fields_set:
            raise ValueError("give either max_steps or epochs, not both")
        return self
