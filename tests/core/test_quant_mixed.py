"""Mixed precision: the greedy width choice, the budget, and the per-layer report."""

import pytest

from core.compression.steps.quantize_mixed import choose_bits
from tests.core.quant_helpers import quantize_with
from tests.models import tiny_bert


def test_most_sensitive_weight_per_bit_is_upgraded_first() -> None:
    sensitivities = {"a": {4: 0.1, 8: 0.0}, "b": {4: 0.01, 8: 0.0}, "c": {4: 0.2, 8: 0.0}}
    assert choose_bits({"a": 10, "b": 10, "c": 40}, sensitivities, [4, 8], 5.0) == {"a": 8, "b": 4, "c": 4}
    assert choose_bits({"a": 10, "b": 10, "c": 40}, sensitivities, [4, 8], 8.0) == {"a": 8, "b": 8, "c": 8}
    assert choose_bits({"a": 10, "b": 10, "c": 40}, sensitivities, [4, 8], 4.0) == {"a": 4, "b": 4, "c": 4}


def test_three_widths_can_skip_the_middle_one() -> None:
    sensitivities = {"a": {2: 1.0, 4: 0.9, 8: 0.0}, "b": {2: 0.01, 4: 0.0, 8: 0.0}}
    assert choose_bits({"a": 1, "b": 1}, sensitivities, [2, 4, 8], 5.0) == {"a": 8, "b": 2}


def test_mixed_step_reports_every_weight_and_keeps_the_budget() -> None:
    fields = {"bits": [4, 8], "budget": {"avg_bits": 6.0}, "calibration": {"num_samples": 2, "seq_len": 16}}
    state, report = quantize_with(tiny_bert(), method="mixed", **fields)
    names = set(state.encodings)
    assert {key.removeprefix("bits/") for key in report.metrics if key.startswith("bits/")} == names
    for name in names:
        assert report.metrics[f"sensitivity/{name}/int4"] >= report.metrics[f"sensitivity/{name}/int8"] >= 0
        expected_bits = report.metrics[f"bits/{name}"]
        assert state.encodings[name].meta["bits"] == expected_bits
    assert 4 < report.metrics["avg_bits"] <= 6.0
    assert report.metrics["avg_bits"] == pytest.approx(6.0, abs=1.0)
