"""Every registered step config answers every rule through its traits: ordering, exports, job submission; a new
method needs only its config (the rules read traits, never lists of names)."""

import dataclasses
from typing import Any, Literal

import pytest
from pydantic import ValidationError

from core.compression.configs.base import COMPRESSED_TENSORS, EXPORT_FORMATS, StepConfig, Traits
from core.compression.configs.lora import LoRA
from core.compression.configs.prune import PruneMagnitude
from core.compression.configs.quantize import WEIGHT_ONLY, QuantizeDynamic
from core.compression.export_rules import check_exports
from core.compression.order import check_order
from core.compression.sequential import TENSOR_ENCODERS
from core.compression.spec import FAMILIES, TAGS, JobSpec, config_class

CONFIGS = [config for family in FAMILIES for config in family]
REQUIRED_FIELDS: dict[str, dict[str, Any]] = {"decompose": {"rank": 4}}


def example(config: type[StepConfig]) -> StepConfig:
    """The config with its defaults, plus the fields it cannot do without."""
    return config.model_validate(REQUIRED_FIELDS.get(config.model_fields["type"].default, {}))


@pytest.mark.parametrize("config", CONFIGS, ids=[config.tag() for config in CONFIGS])
def test_every_config_answers_every_rule(config: type[StepConfig]) -> None:
    assert isinstance(config.traits, Traits)
    for trait in dataclasses.fields(Traits):
        value = getattr(config.traits, trait.name)
        assert value is None or isinstance(value, (bool, str, dict)), f"{config.tag()}: {trait.name} = {value!r}"
    step = example(config)
    for fmt in EXPORT_FORMATS:
        assert step.export_refusal(fmt) is None or step.export_refusal(fmt)
    assert step.weight_changes_refusal() is None or step.weight_changes_refusal()


def test_traits_that_leave_an_export_format_unanswered_are_refused() -> None:
    with pytest.raises(TypeError, match="every export format"):
        dataclasses.replace(WEIGHT_ONLY, exports={COMPRESSED_TENSORS: None})


def test_tags_are_rendered_one_way_and_name_their_config() -> None:
    assert [config.tag() for config in CONFIGS] == TAGS
    assert len(set(TAGS)) == len(TAGS)
    for config in CONFIGS:
        step_type, _, method = config.tag().partition(":")
        assert config_class({"type": step_type, **({"method": method} if method else {})}) is config


def test_job_submission_finds_the_trains_trait_of_a_recipe_step() -> None:
    assert {config.tag() for config in CONFIGS if config.traits.trains} == {"distill", "lora"}
    assert config_class({"type": "lora", "dataset_id": "dst_1"}) is LoRA
    assert config_class({"type": "quantize", "method": "dynamic"}) is QuantizeDynamic
    assert config_class({"type": "no such step"}) is None and config_class({"method": "rtn"}) is None


def test_the_layer_by_layer_engine_runs_exactly_the_steps_whose_traits_say_so() -> None:
    streaming = {config.tag() for config in CONFIGS if config.traits.streams_per_tensor}
    assert streaming == {"quantize:rtn", "quantize:fp8"}
    assert {config.tag() for config in TENSOR_ENCODERS} == streaming


class QuantizeNew(StepConfig):
    """A quantize method added after the rules were written: it declares traits and nothing else."""

    traits = WEIGHT_ONLY.refusing(COMPRESSED_TENSORS, "the new codes have no compressed-tensors format")

    type: Literal["quantize"] = "quantize"
    method: Literal["new"] = "new"


def test_a_new_method_is_ordered_and_exported_by_its_traits_alone() -> None:
    with pytest.raises(ValueError, match=r"step 1 \(prune:magnitude\) cannot follow step 0 \(quantize:new\)"):
        check_order([QuantizeNew(), PruneMagnitude()])
    check_order([PruneMagnitude(), QuantizeNew()])
    with pytest.raises(ValueError, match=r'"compressed-tensors" cannot represent step 0 \(quantize:new\): the new'):
        check_exports([QuantizeNew()], ["compressed-tensors"])
    check_exports([QuantizeNew()], ["onnx"])


@pytest.mark.parametrize(("steps", "message"), [
    ([{"type": "quantize", "method": "static"}, {"type": "lora"}], "inference kernels that cannot train"),
    ([{"type": "quantize", "method": "fp8"}, {"type": "decompose", "rank": 4}], "decompose first, then quantize"),
    ([{"type": "lora", "merge": False}, {"type": "quantize"}], "put it last or use merge: true"),
])
def test_order_rules_read_traits(steps: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        JobSpec.model_validate({"steps": steps})


def test_narrow_targets_are_left_to_the_step_itself() -> None:
    JobSpec.model_validate({"steps": [{"type": "quantize", "targets": ["*.q_proj"]}, {"type": "prune"}]})
