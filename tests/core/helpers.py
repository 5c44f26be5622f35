"""Helpers shared by the core tests."""

from typing import Any

from torch import nn

from core.compression.pipeline import run_pipeline
from core.compression.spec import QuantizeRTN
from core.compression.state import ModelState, StepContext, StepReport


def quantize(model: nn.Module, **fields: Any) -> tuple[ModelState, StepReport]:
    """Apply one QuantizeRTN step (config `fields`) to `model` in place through the real pipeline."""
    state = ModelState(model=model)
    [report] = run_pipeline(state, [QuantizeRTN(type="quantize", **fields)], StepContext())
    return state, report
