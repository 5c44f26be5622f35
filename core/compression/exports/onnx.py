"""Export a (compressed) transformers model to ONNX that runs in ONNX Runtime.

Float layers export as themselves. The int8 Linear modules of the dynamic, static and smoothquant steps export as
ONNX's integer ops with the artifact's own int8 weights: DynamicQuantizeLinear (or QuantizeLinear with the
calibrated scale) -> MatMulInteger (uint8 x int8 -> int32) -> x scale (+ bias), the pattern ONNX Runtime's own
quantizer emits, so ONNX Runtime runs them with its int8 kernels. Weight-only integer layers (rtn, gptq, awq, ...:
plain Linear modules whose stored encoding is an integer grid) export as com.microsoft MatMulNBits with the
artifact's own codes, scales and zero points when given a plan (`onnx_nbits.plan_nbits`); without one, and for
every other float weight, the graph holds the decoded float32 weight. `export_onnx_with_past` writes a causal LM's
decoder step with a KV cache (`past_key_values.{i}.key/value` in, `present.{i}.*` out) for generation loops such as
`greedy_generate_onnx`.

The export (torch.export + onnxscript, torch's current exporter) runs in the calling process: unlike the old
TorchScript exporter (DATA.md: ~2x slower torch model afterwards), it left fp32 and int8 forward times unchanged
here (docs/decisions.md), so no child process and no pickling of the model is needed.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.compression.exports.onnx_nbits import NBitsPlan, nbits_linears, nbits_translations

ONNX_FILE = "model.onnx"
OPSET = 18
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def export_onnx(model: nn.Module, folder: Path, example_inputs: dict[str, torch.Tensor],
                nbits: NBitsPlan | None = None) -> Path:
    """Write `folder/model.onnx` for `model` (called with `**example_inputs`) and return its path.

    `example_inputs` are `input_ids` plus optionally `attention_mask` / `token_type_ids`; their batch and sequence
    dimensions are dynamic in the graph. Graph outputs are the model's output tensors under their own names
    (`last_hidden_state`, `pooler_output`; `logits`). The Linear modules of `nbits` go out as MatMulNBits (the
    model is given back unchanged). Raises RuntimeError if torch cannot export the model.
    Example: `export_onnx(load_compressed("job-42.zip"), Path("out"), probe_inputs(model, tokenizer))`.
    """
    unknown = set(example_inputs) - set(INPUT_NAMES)
    if unknown or "input_ids" not in example_inputs:
        raise ValueError(f"example_inputs: input_ids plus any of {INPUT_NAMES[1:]}, not {sorted(example_inputs)}")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / ONNX_FILE
    wrapper = _TensorOutputs(model.eval()).eval()
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    try:
        with torch.no_grad(), nbits_linears(model, nbits or NBitsPlan()):
            program = torch.onnx.export(
                wrapper,
                (),
                kwargs=dict(example_inputs),
                dynamic_shapes={name: {0: batch, 1: sequence} for name in example_inputs},
                output_names=wrapper.output_names(example_inputs),
                opset_version=OPSET,
                custom_translation_table={**_int8_translations(), **nbits_translations()},
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


CACHE_ONNX_FILE = "model_with_past.onnx"


def export_onnx_with_past(model: nn.Module, folder: Path, nbits: NBitsPlan | None = None) -> Path:
    """Write `folder/model_with_past.onnx`: a causal LM's decoder step with a KV cache, for a generation loop in
    ONNX Runtime, and return its path.

    Inputs: `input_ids` (batch, sequence), `attention_mask` (batch, past + sequence), and per layer i
    `past_key_values.{i}.key` / `.value` (batch, kv heads, past, head dim), the names onnxruntime-genai uses; the first
    step passes a past of length 0. Outputs: `logits` (batch, sequence, vocab) and `present.{i}.key` / `.value` (the
    cache after this step). The Linear modules of `nbits` go out as MatMulNBits, as in `export_onnx`.
    Example: see `greedy_generate_onnx`. Raises RuntimeError if torch cannot export the model.
    """
    config: Any = getattr(model, "config")  # noqa: B009  (typed Any: transformers configs are dynamic)
    layers = int(config.num_hidden_layers)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    batch, sequence, past, total = (torch.export.Dim(name) for name in ("batch", "sequence", "past", "total"))
    example_past = [torch.zeros(2, kv_heads, 3, head_dim) for _ in range(2 * layers)]
    ids = torch.zeros(2, 4, dtype=torch.long)
    mask = torch.ones(2, 7, dtype=torch.long)
    names = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / CACHE_ONNX_FILE
    wrapper = _WithPast(model.eval(), layers).eval()
    try:
        with torch.no_grad(), nbits_linears(model, nbits or NBitsPlan()):
            program = torch.onnx.export(
                wrapper, (ids, mask, example_past),
                input_names=["input_ids", "attention_mask", *names],
                output_names=["logits", *(name.replace("past_key_values", "present") for name in names)],
                dynamic_shapes=({0: batch, 1: sequence}, {0: batch, 1: total}, [{0: batch, 2: past}] * len(names)),
                opset_version=OPSET, custom_translation_table={**_int8_translations(), **nbits_translations()},
                external_data=False, dynamo=True, verbose=False,
            )
    except Exception as exc:  # as in export_onnx
        raise RuntimeError(f"ONNX export with a KV cache failed: {type(exc).__name__}: {str(exc)[:2000]}") from exc
    if program is None:
        raise RuntimeError("ONNX export with a KV cache returned no program")
    program.save(str(target))
    return target


def greedy_generate_onnx(path: Path, input_ids: Any, max_new_tokens: int,
                         eos_token_id: int | Sequence[int] | None = None, threads: int = 1) -> list[int]:
    """Greedy tokens from `export_onnx_with_past`'s file for one prompt (a 1-D sequence of ids): the prompt once,
    then one token per step with the cache fed back, stopping after an end token (`eos_token_id`: one id or several,
    as a generation config holds it; None: never stop early).
    To compare with transformers, give it the model's `generation_config.eos_token_id` and call `generate` without
    `min_new_tokens`: that option hides the end token from the argmax, so generate's tokens are no longer greedy.
    Example: `greedy_generate_onnx(Path("out/model_with_past.onnx"), tokenizer("Hi").input_ids, 20, eos_token_id=2)`.
    """
    import numpy as np
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds: dict[str, Any] = {}
    for spec in session.get_inputs():
        if spec.name.startswith("past_key_values."):
            shape = [1, spec.shape[1], 0, spec.shape[3]]
            feeds[spec.name] = np.zeros(shape, dtype=np.float32)
    ends = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    step = np.asarray(input_ids, dtype=np.int64).reshape(1, -1)
    length, tokens = step.shape[1], []
    presents = [o.name for o in session.get_outputs()][1:]
    for _ in range(max_new_tokens):
        logits, *cache = session.run(None, {"input_ids": step, "attention_mask": np.ones((1, length), np.int64),
                                            **feeds})
        token = int(logits[0, -1].argmax())
        tokens.append(token)
        if token in ends:
            break
        feeds.update({name.replace("present", "past_key_values"): value for name, value in zip(presents, cache,
                                                                                              strict=True)})
        step, length = np.array([[token]], dtype=np.int64), length + 1
    return tokens


class _WithPast(nn.Module):
    """A causal LM step with its KV cache as flat tensors in and out (ModelOutput and Cache objects are not graph
    inputs or outputs)."""

    def __init__(self, model: nn.Module, layers: int) -> None:
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                past: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)  # type: ignore[arg-type]
        for layer in range(self.layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
        present = outputs.past_key_values
        tensors = []
        for cached in present.layers[:self.layers]:
            tensors += [cached.keys, cached.values]
        return (outputs.logits, *tensors)
