"""Compression recipes: one pydantic config per step method, joined into one tagged union.

Each config is tagged `<type>:<method>` (or just `<type>` for a family with a single config and no `method`); a
step without `method` gets its family's default (the first config listed). The same JSON is accepted everywhere
(REST body, CLI file, tests, docs). Configs are pure data, no torch: the API validates a recipe without loading a
model, and every bad field is reported at once as a 422.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Self, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, GetJsonSchemaHandler, Tag, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from core.compression.configs import decompose, distill, encode, lora, prune, quantize
from core.compression.configs.base import ExportFormat, StepConfig, declared
from core.compression.configs.quantize import QuantizeRTN
from core.compression.export_rules import check_exports
from core.compression.order import check_order

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


class JobSpec(BaseModel):
    """What a job runs: an ordered list of steps applied to one uploaded model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: list[StepSpec] = Field(min_length=1, max_length=32)
    export: list[ExportFormat] = Field(
        default_factory=list, max_length=2,
        description='extra formats written into the artifact: "onnx" adds model.onnx (runs in onnxruntime); '
                    '"compressed-tensors" adds the folder compressed-tensors/ (transformers and vLLM load it)',
    )

    @model_validator(mode="after")
    def _order_can_work(self) -> Self:
        check_order(self.steps)
        if len(set(self.export)) != len(self.export):
            raise ValueError(f"export lists a format twice: {self.export}")
        check_exports(self.steps, self.export)
        return self


__all__ = ["JobSpec", "QuantizeRTN", "StepConfig", "StepSpec", "config_class"]
