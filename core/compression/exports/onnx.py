"""Export a (compressed) transformers model to ONNX that runs in ONNX Runtime.

Float layers export as themselves. The int8 Linear modules of the dynamic, static and smoothquant steps export as
ONNX's integer ops with the artifact's own int8 weights: DynamicQuantizeLinear (or QuantizeLinear with the
calibrated scale) -> MatMulInteger (uint8 x int8 -> int32) -> x scale (+ bias), the pattern ONNX Runtime's own
quantizer emits, so ONNX Runtime runs them with its int8 kernels.

The export (torch.export + onnxscript, torch's current exporter) runs in the calling process: unlike the old
TorchScript exporter (DATA.md: ~2x slower torch model afterwards), it left fp32 and int8 forward times unchanged
here (docs/decisions.md), so no child process and no pickling of the model is needed.
"""

from pathlib import Path
from typing import Any

import torch
from torch import nn

ONNX_FILE = "model.onnx"
OPSET = 18
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def export_onnx(model: nn.Module, folder: Path, example_inputs: dict[str, torch.Tensor]) -> Path:
    """Write `folder/model.onnx` for `model` (called with `**example_inputs`) and return its path.

    `example_inputs` are `input_ids` plus optionally `attention_mask` / `token_type_ids`; their batch and sequence
    dimensions are dynamic in the graph. Graph outputs are the model's output tensors under their own names
    (`last_hidden_state`, `pooler_output`; `logits`). Raises RuntimeError if torch cannot export the model.
    Example: `export_onnx(load_compressed("job-42.zip"), Path("out"), probe_inputs(model, tokenizer))`.
    """
    unknown = set(example_inputs) - set(INPUT_NAMES)
    if unknown or "input_ids" not in example_inputs:
        raise ValueError(f"example_inputs: input_ids plus any of {INPUT_NAMES[1:]}, not {sorted(example_inputs)}")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / ONNX_FILE
    wrapper = _TensorOutputs(model.eval())
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                wrapper,
                (),
                kwargs=dict(example_inputs),
                dynamic_shapes={name: {0: batch, 1: sequence} for name in example_inputs},
                output_names=wrapper.output_names(example_inputs),
                opset_version=OPSET,
                custom_translation_table=_int8_translations(),
                external_data=False,
                dynamo=True,
                verbose=False,
            )
    except Exception as exc:  # torch.export's errors are many and version-specific: one clear failure instead
        raise RuntimeError(f"ONNX export failed: {type(exc).__name__}: {str(exc)[:2000]}") from exc
    program.save(str(target))
    return target


class _TensorOutputs(nn.Module):
    """Calls a transformers model without a KV cache and returns its output tensors as a tuple (ModelOutput and
    cache objects are not graph outputs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.options = {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) else {}

    def output_names(self, example_inputs: dict[str, torch.Tensor]) -> list[str]:
        """The model's own names for its tensor outputs (last_hidden_state, logits, ...)."""
        return [name for name, _ in self._tensors(self.model(**example_inputs, **self.options))]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        # Named arguments (not **inputs) so that torch.export and the ONNX graph get the inputs' own names.
        inputs = {"attention_mask": attention_mask, "token_type_ids": token_type_ids}
        given = {name: value for name, value in inputs.items() if value is not None}
        outputs = self.model(input_ids=input_ids, **given, **self.options)
        return tuple(value for _, value in self._tensors(outputs))

    @staticmethod
    def _tensors(outputs: Any) -> list[tuple[str, torch.Tensor]]:
        items = outputs.items() if hasattr(outputs, "items") else enumerate(outputs)
        return [(str(name), value) for name, value in items if isinstance(value, torch.Tensor)]


def _int8_translations() -> dict[Any, Any]:
    """ONNX translations of the int8 Linear export ops (core.compression.int8.layers)."""
    import onnxscript
    from onnxscript import opset18 as op

    import core.compression.int8.layers  # noqa: F401  (registers torch.ops.mcs.*)

    def integer_matmul(x_codes: Any, x_scale: Any, x_zero_point: Any, qweight: Any, weight_scale: Any) -> Any:
        codes = op.MatMulInteger(x_codes, op.Transpose(qweight, perm=[1, 0]), x_zero_point)  # weights: zero point 0
        return op.Mul(op.Cast(codes, to=onnxscript.FLOAT.dtype), op.Mul(x_scale, weight_scale))

    def dynamic(x: Any, qweight: Any, weight_scale: Any, bias: Any = None) -> Any:
        x_codes, x_scale, x_zero_point = op.DynamicQuantizeLinear(x)
        y = integer_matmul(x_codes, x_scale, x_zero_point, qweight, weight_scale)
        return y if bias is None else op.Add(y, bias)

    def static(x: Any, qweight: Any, weight_scale: Any, bias: Any, input_scale: Any, input_zero_point: Any) -> Any:
        # QuantizeLinear wants scalar (per-tensor) parameters; the module stores them as 1-element tensors.
        zero_point = op.Cast(op.Squeeze(input_zero_point), to=onnxscript.UINT8.dtype)
        scale = op.Squeeze(input_scale)
        x_codes = op.QuantizeLinear(x, scale, zero_point)
        y = integer_matmul(x_codes, scale, zero_point, qweight, weight_scale)
        return y if bias is None else op.Add(y, bias)

    return {torch.ops.mcs.int8_linear_dynamic.default: dynamic, torch.ops.mcs.int8_linear_static.default: static}
