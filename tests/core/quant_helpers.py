"""Helpers shared by the quantization tests (test_quant_*.py)."""

from typing import Any

from torch import nn

from core.compression.metrics import model_outputs, output_cosine, probe_inputs
from core.compression.pipeline import run_pipeline
from core.compression.spec import JobSpec
from core.compression.state import ModelState, StepContext, StepReport


def quantize_with(model: nn.Module, tokenizer: Any = None, **fields: Any) -> tuple[ModelState, StepReport]:
    """Apply one `{"type": "quantize", **fields}` step (any method) to `model` in place through the real pipeline."""
    state = ModelState(model=model, tokenizer=tokenizer)
    [report] = run_pipeline(state, JobSpec(steps=[{"type": "quantize", **fields}]).steps, StepContext())
    return state, report


def cosine_vs_fp32(reference: nn.Module, quantized: nn.Module) -> float:
    """Mean output cosine of `quantized` vs `reference` on the fixed probe inputs (the service's metric)."""
    inputs = probe_inputs(reference)
    return output_cosine(model_outputs(reference, inputs), model_outputs(quantized, inputs), inputs["attention_mask"])
