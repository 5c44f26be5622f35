"""Validation of the quantize configs: bad values become pydantic errors that name the field."""

import pytest
from pydantic import ValidationError

from core.compression.spec import JobSpec


def errors_for(step: dict) -> list[tuple[tuple, str]]:
    with pytest.raises(ValidationError) as raised:
        JobSpec(steps=[step])
    return [(error["loc"], error["msg"]) for error in raised.value.errors()]


@pytest.mark.parametrize(
    ("step", "field"),
    [
        ({"type": "quantize", "bits": 9}, "bits"),
        ({"type": "quantize", "bits": 1}, "bits"),
        ({"type": "quantize", "method": "kmeans", "bits": 16}, "bits"),
        ({"type": "quantize", "method": "gptq", "group_size": 4}, "group_size"),
        ({"type": "quantize", "method": "gptq", "dampening": 0}, "dampening"),
        ({"type": "quantize", "method": "gptq", "calibration": {"num_samples": 0}}, "num_samples"),
        ({"type": "quantize", "method": "gptq", "calibration": {"seq_len": 100_000}}, "seq_len"),
        ({"type": "quantize", "method": "gptq", "calibration": {"dataset": "x"}}, "dataset"),
        ({"type": "quantize", "method": "mixed", "bits": [4, 9]}, "bits"),
        ({"type": "quantize", "method": "fp8", "granularity": "per_group"}, "granularity"),
    ],
)
def test_out_of_bounds_fields_are_named(step: dict, field: str) -> None:
    assert any(field in location for location, _ in errors_for(step))


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ({"type": "quantize", "bits": 4, "granularity": "per_group"}, "group_size is required"),
        ({"type": "quantize", "bits": 4, "group_size": 64}, "group_size only applies"),
        ({"type": "quantize", "method": "mixed", "bits": [4, 4]}, "distinct"),
        ({"type": "quantize", "method": "mixed", "budget": {"avg_bits": 3.0}}, "budget.avg_bits"),
    ],
)
def test_inconsistent_fields_are_explained(step: dict, message: str) -> None:
    assert any(message in text for _, text in errors_for(step))


@pytest.mark.parametrize(
    "step",
    [
        {"type": "quantize"},
        {"type": "quantize", "bits": 3, "granularity": "per_channel"},
        {"type": "quantize", "bits": 2, "granularity": "per_tensor", "symmetric": False},
        {"type": "quantize", "method": "kmeans", "bits": 3, "granularity": "per_tensor"},
        {"type": "quantize", "method": "gptq", "bits": 8, "granularity": "per_channel"},
        {"type": "quantize", "method": "fp8"},
        {"type": "quantize", "method": "mixed", "bits": [2, 4, 8], "budget": {"avg_bits": 3.5}},
    ],
)
def test_supported_combinations_are_accepted(step: dict) -> None:
    [config] = JobSpec(steps=[step]).steps
    assert config.method == step.get("method", "rtn")


def test_a_default_group_size_is_ignored_per_channel() -> None:
    [config] = JobSpec(steps=[{"type": "quantize", "method": "gptq", "granularity": "per_channel"}]).steps
    assert config.columns_per_scale is None
    [grouped] = JobSpec(steps=[{"type": "quantize", "method": "gptq"}]).steps
    assert grouped.columns_per_scale == 128


def test_mixed_widths_are_sorted() -> None:
    [config] = JobSpec(steps=[{"type": "quantize", "method": "mixed", "bits": [8, 4]}]).steps
    assert config.bits == [4, 8] and config.budget.avg_bits == 5.0
