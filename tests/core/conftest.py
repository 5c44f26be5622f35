"""Fixtures for core tests: run the quantize step through the real pipeline on the tiny models."""

from collections.abc import Callable
from typing import Any

import pytest

from core.compression.pipeline import run_pipeline
from core.compression.spec import QuantizeRTN
from core.compression.state import ModelState, StepContext, StepReport

Quantize = Callable[..., tuple[ModelState, StepReport]]


@pytest.fixture
def quantize() -> Quantize:
    """`quantize(model, **config_fields)` -> (state, report): one QuantizeRTN step applied in place."""

    def run(model: Any, **fields: Any) -> tuple[ModelState, StepReport]:
        state = ModelState(model=model)
        [report] = run_pipeline(state, [QuantizeRTN(type="quantize", **fields)], StepContext())
        return state, report

    return run
