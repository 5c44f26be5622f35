"""W8A8 steps (dynamic, static, smoothquant) on tiny BERT and Llama models: numerics vs fp32, int8 kernel modules
in the loaded artifact, SmoothQuant folding, config validation, ONNX export run by onnxruntime."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel

from core.compression.artifact import load_compressed, save_compressed
from core.compression.int8.layers import DynamicInt8Linear, Int8Linear, StaticInt8Linear
from core.compression.int8.smoothing import fold, llama_fold_groups
from core.compression.metrics import model_outputs, output_cosine, probe_inputs
from core.compression.pipeline import run_pipeline
from core.compression.spec import JobSpec
from core.compression.state import ModelState, StepContext, StepReport
from core.errors import InvalidSpec
from tests.models import tiny_bert, tiny_llama

CALIBRATION = {"num_samples": 4, "seq_len": 32}
STEPS = {
    "dynamic": {"type": "quantize", "method": "dynamic"},
    "static": {"type": "quantize", "method": "static", "observer": "mse", "calibration": CALIBRATION},
    "smoothquant": {"type": "quantize", "method": "smoothquant", "alpha": 0.75, "calibration": CALIBRATION},
}
MIN_COSINE = 0.995


def compress(model: nn.Module, step: dict[str, Any]) -> tuple[ModelState, StepReport]:
    state = ModelState(model)
    [report] = run_pipeline(state, JobSpec.model_validate({"steps": [step]}).steps, StepContext())
    return state, report


def cosine_vs(reference: nn.Module, candidate: nn.Module) -> float:
    inputs = probe_inputs(reference)
    return output_cosine(model_outputs(reference, inputs), model_outputs(candidate, inputs), inputs["attention_mask"])


def with_outlier_channels(model: PreTrainedModel) -> PreTrainedModel:
    """Llama-style activation outliers: a few hidden channels of every norm's output scaled up 40x."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("layernorm"):
                module.weight[[3, 17, 40]] *= 40
    return model


@pytest.mark.parametrize("method", STEPS)
@pytest.mark.parametrize("build", [tiny_bert, tiny_llama])
def test_outputs_stay_close_to_fp32(build: Callable[[], PreTrainedModel], method: str) -> None:
    state, report = compress(build(), STEPS[method])
    assert cosine_vs(build(), state.model) >= MIN_COSINE
    linears = [m for m in state.model.modules() if isinstance(m, nn.Linear)]
    assert report.metrics["modules_quantized"] == len([m for m in state.model.modules() if isinstance(m, Int8Linear)])
    assert all(m is state.model.get_output_embeddings() for m in linears)  # only the tied lm_head stays float


def test_smoothquant_beats_naive_int8_on_activation_outliers() -> None:
    reference = with_outlier_channels(tiny_llama())
    naive, _ = compress(with_outlier_channels(tiny_llama()), STEPS["dynamic"])
    smooth, report = compress(with_outlier_channels(tiny_llama()), STEPS["smoothquant"])
    naive_error, smooth_error = 1 - cosine_vs(reference, naive.model), 1 - cosine_vs(reference, smooth.model)
    assert smooth_error < naive_error / 2
    assert report.metrics["linears_folded"] == 14 and report.metrics["linears_runtime_smoothed"] == 0


def test_folding_smoothing_scales_keeps_the_float_model_identical() -> None:
    reference, model = tiny_llama(), tiny_llama()
    generator = torch.Generator().manual_seed(0)
    for group in llama_fold_groups(model):
        channels = model.get_submodule(group.producer).weight.shape[0]
        fold(model, group, torch.rand(channels, generator=generator) + 0.5)
    inputs = probe_inputs(reference)
    torch.testing.assert_close(model_outputs(model, inputs), model_outputs(reference, inputs), atol=1e-5, rtol=1e-4)


def test_bert_is_smoothed_at_run_time_since_post_norm_cannot_fold() -> None:
    state, report = compress(tiny_bert(), STEPS["smoothquant"])
    assert report.metrics["linears_folded"] == 0
    assert all(m.input_factor is not None for m in state.model.modules() if isinstance(m, Int8Linear))


@pytest.mark.parametrize(("method", "kind"), [("dynamic", DynamicInt8Linear), ("static", StaticInt8Linear),
                                              ("smoothquant", DynamicInt8Linear)])
@pytest.mark.parametrize("build", [tiny_bert, tiny_llama])
def test_loaded_artifact_runs_int8_modules_and_matches(tmp_path: Path, build: Callable[[], PreTrainedModel],
                                                       method: str, kind: type) -> None:
    state, _ = compress(build(), STEPS[method])
    save_compressed(state, tmp_path / "artifact", {})
    loaded = load_compressed(tmp_path / "artifact")
    converted = {name for name, m in state.model.named_modules() if isinstance(m, Int8Linear)}
    assert converted and {name for name, m in loaded.named_modules() if type(m) is kind} == converted
    inputs = probe_inputs(loaded)
    assert torch.equal(model_outputs(loaded, inputs), model_outputs(state.model, inputs))
    stored = load_file(tmp_path / "artifact" / "model.safetensors")
    assert all(stored[f"{name}.qweight"].dtype == torch.int8 for name in converted)
    assert not any(f"{name}.weight" in stored for name in converted)


def test_static_module_matches_its_quantize_dequantize_reference() -> None:
    state, _ = compress(tiny_llama(), STEPS["static"])
    module = state.model.model.layers[0].mlp.down_proj
    scale, zero_point = module.input_scale.item(), int(module.input_zero_point.item())
    # Inputs inside the lower 7-bit half of the calibrated range: exact on every CPU (without VNNI, fbgemm sums u8
    # x s8 pairs in saturating int16, which is why static ranges default to 7 bits there).
    low, high = -zero_point * scale, (127 - zero_point) * scale
    x = low + (high - low) * torch.rand(3, 5, module.in_features, generator=torch.Generator().manual_seed(1))
    codes = torch.clamp(torch.round(x / scale) + zero_point, 0, 255)
    expected = nn.functional.linear((codes - zero_point) * scale, module.dequantized_weight(), module.bias)
    torch.testing.assert_close(module(x), expected, atol=1e-4, rtol=1e-4)


def test_no_selected_linear_is_an_invalid_spec() -> None:
    with pytest.raises(InvalidSpec, match="select no untied nn.Linear"):
        compress(tiny_bert(), {**STEPS["dynamic"], "targets": ["no.such.module"]})


@pytest.mark.parametrize(("step", "field"), [
    ({"method": "static", "observer": "minmax", "percentile": 99.0}, "percentile"),
    ({"method": "static", "observer": "kl"}, "observer"),
    ({"method": "static", "bins": 10}, "bins"),
    ({"method": "smoothquant", "alpha": 1.5}, "alpha"),
    ({"method": "smoothquant", "calibration": {"num_samples": 0}}, "num_samples"),
    ({"method": "dynamic", "granularity": "per_group"}, "granularity"),
    ({"method": "dynamic", "bits": 4}, "bits"),
])
def test_invalid_configs_name_the_field(step: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as error:
        JobSpec.model_validate({"steps": [{"type": "quantize", **step}]})
    assert field in str(error.value)


@pytest.mark.slow  # torch.export + ONNX translation: about 10 s per model
@pytest.mark.parametrize(("build", "method"), [(tiny_bert, "dynamic"), (tiny_llama, "static")])
def test_onnx_export_runs_in_onnxruntime_with_matching_outputs(tmp_path: Path, build: Callable[[], PreTrainedModel],
                                                               method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    from core.compression.exports.onnx import export_onnx
    from core.compression.int8 import layers

    # ONNX's DynamicQuantizeLinear is 8-bit: compare with the module's 8-bit arithmetic, which it runs on CPUs with
    # VNNI (without VNNI it switches to 7 bits, which no ONNX operator expresses).
    monkeypatch.setattr(layers, "_VNNI", True)

    state, _ = compress(build(), STEPS[method])
    path = export_onnx(state.model, tmp_path / "onnx", probe_inputs(state.model, batch=2, seq_len=16))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = probe_inputs(state.model, batch=3, seq_len=24, seed=1)  # other shapes: the axes are dynamic
    [onnx_out, *_] = session.run(None, {name: value.numpy() for name, value in inputs.items()})
    expected = model_outputs(state.model, inputs)
    assert {node.op_type for node in _onnx_nodes(path)} >= {"MatMulInteger"}
    assert output_cosine(expected, torch.from_numpy(onnx_out), inputs["attention_mask"]) >= 0.9999
    torch.testing.assert_close(torch.from_numpy(onnx_out), expected, atol=2e-3 * expected.abs().max().item(), rtol=0)


def _onnx_nodes(path: Path) -> list[Any]:
    import onnx

    return list(onnx.load(str(path)).graph.node)


def test_static_ranges_use_7_bits_on_cpus_without_vnni_unless_told() -> None:
    from core.compression.configs.quantize import QuantizeStatic
    from core.compression.int8.cpu import cpu_has_vnni

    assert QuantizeStatic(method="static").static_reduce_range() is (not cpu_has_vnni())
    assert QuantizeStatic(method="static", reduce_range=True).static_reduce_range() is True
    assert QuantizeStatic(method="static", reduce_range=False).static_reduce_range() is False
