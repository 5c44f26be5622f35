"""Compression recipes: one pydantic config per step method, joined into one tagged union.

Each config is tagged `<type>:<method>` (or just `<type>` for a family with a single config and no `method`); a
step without `method` gets its family's default (the first config listed). The same JSON is accepted everywhere
(REST body, CLI file, tests, docs). Configs are pure data, no torch: the API validates a recipe without loading a
model, and every bad field is reported at once as a 422.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self, Union, get_args

from pydantic import BaseModel, ConfigDict, Discriminator, Field, GetJsonSchemaHandler, Tag, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from core.compression.configs import decompose, distill, encode, lora, prune, quantize
from core.compression.configs.base import ExportFormat, StepConfig, declared
from core.compression.configs.quantize import QuantizeRTN
from core.compression.export_rules import check_exports
from core.compression.order import check_order
from core.compression.runtime_rules import Runtime, check_runtimes

# Add a family's CONFIGS here; its first config's method is the family default.
FAMILIES: tuple[tuple[type[StepConfig], ...], ...] = (
    quantize.CONFIGS, prune.CONFIGS, decompose.CONFIGS, encode.CONFIGS, distill.CONFIGS, lora.CONFIGS
)

DEFAULT_METHODS = {declared(f[0], "type"): declared(f[0], "method") for f in FAMILIES}
CONFIGS_BY_TAG = {config.tag(): config for family in FAMILIES for config in family}


def _discriminate(value: Any) -> str | None:
    get = value.get if isinstance(value, dict) else lambda key, default=None: getattr(value, key, default)
    step_type = get("type")
    if step_type is None:
        return None
    default = DEFAULT_METHODS.get(step_type)
    return f"{step_type}:{get('method', default)}" if default else str(step_type)


def config_class(step: dict[str, Any]) -> type[StepConfig] | None:
    """The config class a recipe step (as JSON) names, None when it names none; for rules on unparsed recipes.

    Example: `config_class({"type": "distill", "dataset_id": "dst_1"}).traits.trains` is True.
    """
    tag = _discriminate(step)
    return None if tag is None else CONFIGS_BY_TAG.get(tag)


@dataclass(frozen=True)
class _DocumentedTag:
    """Marks a config's tag fields required in its JSON schema, as `_discriminate` requires them: `type` always,
    `method` unless it is the family default. Without this the OpenAPI document would call a step without `type`
    valid (the field has a default) while the parser refuses it."""

    fields: tuple[str, ...]

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        json_schema = handler(schema)
        target = handler.resolve_ref_schema(json_schema)
        target["required"] = sorted({*target.get("required", []), *self.fields})
        return json_schema


def _tag_fields(config: type[StepConfig], family: tuple[type[StepConfig], ...]) -> _DocumentedTag:
    has_method = declared(config, "method") is not None
    return _DocumentedTag(("type", "method") if has_method and config is not family[0] else ("type",))


TAGS = list(CONFIGS_BY_TAG)
_MEMBERS = tuple(Annotated[config, Tag(config.tag()), _tag_fields(config, family)]
                 for family in FAMILIES for config in family)
if TYPE_CHECKING:  # a type checker cannot follow the union built at run time; every member is a StepConfig
    StepSpec = StepConfig
else:
    StepSpec = Annotated[
        Union.__getitem__(_MEMBERS),  # a Union built from the tuple of tagged configs
        Discriminator(
            _discriminate,
            custom_error_type="unknown_step",
            custom_error_message=f"unknown step: `type` (and `method`) must be one of {', '.join(TAGS)}",
        ),
    ]


EvaluationMetric = Literal["perplexity", "accuracy", "generation_agreement", "embedding_cosine", "sts_spearman",
                           "classification_accuracy", "macro_f1"]
ModelKind = Literal["causal_lm", "encoder", "classifier", "other"]
# Which metrics each kind of model can be measured with (see core.compression.evaluate for what each one needs).
METRICS_BY_KIND: dict[ModelKind, tuple[EvaluationMetric, ...]] = {
    "causal_lm": ("perplexity", "accuracy", "generation_agreement"),
    "encoder": ("embedding_cosine", "sts_spearman"),
    "classifier": ("classification_accuracy", "macro_f1"),
    "other": (),
}
KIND_NAMES: dict[ModelKind, str] = {"causal_lm": "a causal LM", "encoder": "an encoder",
                                    "classifier": "a sequence classifier", "other": "a kind no metric measures yet"}


def model_kind(architecture: str) -> ModelKind:
    """The kind of model a transformers class name is, for the evaluation metrics; e.g. "LlamaForCausalLM" is
    "causal_lm", "BertForSequenceClassification" "classifier", "BertModel" (a bare model) "encoder", and
    "BertForMaskedLM" "other"."""
    if architecture.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal_lm"
    if architecture.endswith("ForSequenceClassification"):
        return "classifier"
    return "encoder" if architecture.endswith("Model") else "other"


def evaluation_refusal(metrics: list[str], architecture: str) -> str | None:
    """Why some of `metrics` cannot measure a model of class `architecture` (None when all can).
    Example: `evaluation_refusal(["perplexity"], "BertModel")` says perplexity needs a causal LM."""
    kind = model_kind(architecture)
    unfit = [metric for metric in metrics if metric not in METRICS_BY_KIND[kind]]
    if not unfit:
        return None
    fitting = ", ".join(METRICS_BY_KIND[kind]) or "none of them"
    return (f"evaluation metric(s) {', '.join(unfit)} do not fit {architecture} ({KIND_NAMES[kind]}); "
            f"it can be measured with {fitting}")


class EvaluateSpec(BaseModel):
    """Measure the original and the artifact on the tenant's own held-out dataset; every delta with a paired
    bootstrap 95% CI (see core.compression.evaluate). Example:
    `{"dataset_id": "dst_...", "metrics": ["perplexity", "generation_agreement"], "max_samples": 200}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset_id: str = Field(min_length=1, max_length=128, description="an uploaded dataset of the tenant (JSONL)")
    metrics: list[EvaluationMetric] = Field(
        min_length=1, max_length=len(get_args(EvaluationMetric)),
        description="causal LMs: perplexity, accuracy (multiple choice rows: question, choices, answer), "
                    "generation_agreement; encoders: embedding_cosine, sts_spearman (rows: text, text_pair, score); "
                    "sequence classifiers: classification_accuracy, macro_f1 (rows: text, label)")
    max_samples: int = Field(256, ge=1, le=10_000, description="the first N rows of the dataset are used")

    @model_validator(mode="after")
    def _metrics_once(self) -> Self:
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"evaluate.metrics lists a metric twice: {self.metrics}")
        return self


def step_datasets(steps: list[StepConfig]) -> list[str | None]:
    """The datasets the steps calibrate or train on, in order (None: the default corpus).
    Example: a gptq step without a calibration dataset gives `[None]`."""
    found: list[str | None] = []
    for step in steps:
        found.extend(value for key, value in _walk_items(step.model_dump()) if key == "dataset_id")
    return list(dict.fromkeys(found))


def _walk_items(value: object) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [pair for key, item in value.items() for pair in [(key, item), *_walk_items(item)]]
    if isinstance(value, list):
        return [pair for item in value for pair in _walk_items(item)]
    return []


class JobSpec(BaseModel):
    """What a job runs: an ordered list of steps applied to one uploaded model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: list[StepSpec] = Field(min_length=1, max_length=32)
    export: list[ExportFormat] = Field(
        default_factory=list, max_length=3,
        description='extra formats written into the artifact: "onnx" adds model.onnx (runs in onnxruntime; a '
                    'causal LM gets model_with_past.onnx, its decoder step with a KV cache, instead); '
                    '"compressed-tensors" adds the folder compressed-tensors/ (transformers and vLLM load it); '
                    '"gguf" adds model.gguf (llama.cpp, Ollama, LM Studio; Llama-family causal LMs)',
    )
    evaluate: EvaluateSpec | None = Field(None, description="measure original and artifact on your own dataset")
    runtimes: list[Runtime] = Field(
        default_factory=list, max_length=3,
        description='runtimes the artifact will be deployed on, each timed on the original and the artifact '
                    '(encoders: batch latency; causal LMs: prefill and decode tokens/s) with a note where the '
                    'artifact is not faster or not smaller in memory there: "torch", "onnxruntime" (the ONNX '
                    'export), "llama.cpp" (the GGUF export). A runtime no live worker of the queue has is refused',
    )

    @model_validator(mode="after")
    def _order_can_work(self) -> Self:
        check_order(self.steps)
        if len(set(self.export)) != len(self.export):
            raise ValueError(f"export lists a format twice: {self.export}")
        check_exports(self.steps, self.export)
        check_runtimes(self.steps, self.runtimes)
        if self.evaluate and self.evaluate.dataset_id in step_datasets(self.steps):
            raise ValueError(f"evaluate.dataset_id {self.evaluate.dataset_id!r} is also a dataset the steps "
                             "calibrate or train on; evaluate on held-out data (upload a separate dataset)")
        return self


__all__ = ["EvaluateSpec", "JobSpec", "QuantizeRTN", "StepConfig", "StepSpec", "config_class"]
