"""The QuantizeRTN step on tiny BERT and Llama models: accuracy, module selection, ties, progress, cancellation."""

from collections.abc import Callable

import pytest
import torch
from torch import nn

from core.compression.encoding import decode
from core.compression.metrics import model_outputs, output_cosine, probe_inputs
from core.compression.pipeline import run_pipeline
from core.compression.spec import QuantizeRTN
from core.compression.state import ModelState, StepContext
from core.errors import InvalidSpec, JobCancelled
from tests.core.helpers import quantize
from tests.models import tiny_bert, tiny_llama

MIN_OUTPUT_COSINE = 0.999


def cosine_vs_fp32(reference: nn.Module, quantized: nn.Module) -> float:
    inputs = probe_inputs(reference)
    return output_cosine(model_outputs(reference, inputs), model_outputs(quantized, inputs), inputs["attention_mask"])


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
@pytest.mark.parametrize("build", [tiny_bert, tiny_llama])
def test_output_stays_close_to_fp32(build: Callable[[], nn.Module], granularity: str, symmetric: bool) -> None:
    reference = build()
    state, _ = quantize(build(), granularity=granularity, symmetric=symmetric)
    assert cosine_vs_fp32(reference, state.model) >= MIN_OUTPUT_COSINE


def test_every_linear_and_embedding_weight_is_encoded_and_decoded_in_place() -> None:
    model = tiny_bert()
    expected = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    state, report = quantize(model)
    assert set(state.encodings) == expected
    parameters = dict(model.named_parameters())
    for name, encoding in state.encodings.items():
        assert encoding.tensors["qweight"].dtype == torch.int8
        assert torch.equal(parameters[name], decode(encoding))
    assert report.metrics["modules_quantized"] == len(expected)
    assert report.metrics["params_quantized"] == sum(parameters[name].numel() for name in expected)
    assert report.metrics["stored_bytes"] == sum(encoding.nbytes() for encoding in state.encodings.values())


def test_tied_embedding_is_quantized_and_stored_once() -> None:
    model = tiny_llama()
    state, report = quantize(model, include_embeddings=True)  # named: else the head and its embedding are kept
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "model.embed_tokens.weight" in state.encodings
    assert "lm_head.weight" not in state.encodings
    assert report.metrics["modules_quantized"] == report.metrics["tensors_quantized"] + 1
    assert any("shared by model.embed_tokens, lm_head" in note for note in report.notes)


def test_targets_and_exclude_select_modules_by_name() -> None:
    state, _ = quantize(tiny_bert(), targets=["encoder.layer.0.*"], exclude=["*.output.dense"])
    assert set(state.encodings) == {
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.0.attention.self.key.weight",
        "encoder.layer.0.attention.self.value.weight",
        "encoder.layer.0.intermediate.dense.weight",
    }


def test_embeddings_can_be_left_in_float() -> None:
    state, _ = quantize(tiny_bert(), include_embeddings=False)
    assert state.encodings and not any("embeddings" in name for name in state.encodings)


@pytest.mark.parametrize(
    ("fields", "named"),
    [({"targets": ["decoder.*"]}, "decoder.*"), ({"exclude": ["*"]}, "'*'"), ({"targets": ["embeddings.*"]}, "Linear")],
)
def test_selecting_nothing_is_an_invalid_spec(fields: dict, named: str) -> None:
    config = QuantizeRTN(type="quantize", include_embeddings=False, **fields)
    with pytest.raises(InvalidSpec, match="select no") as raised:
        run_pipeline(ModelState(model=tiny_bert()), [config], StepContext())
    assert named in raised.value.message


def test_progress_is_reported_up_to_done() -> None:
    progress: list[float] = []
    context = StepContext(report=lambda fraction, message: progress.append(fraction))
    run_pipeline(ModelState(model=tiny_bert()), [QuantizeRTN(type="quantize")], context)
    assert progress == sorted(progress) and progress[-1] == 1.0 and len(progress) == 16


def test_cancellation_is_checked_between_modules() -> None:
    polls = iter([False, False, False, True])
    state = ModelState(model=tiny_bert())
    context = StepContext(should_stop=lambda: next(polls))
    with pytest.raises(JobCancelled):
        run_pipeline(state, [QuantizeRTN(type="quantize")], context)
    assert len(state.encodings) == 2  # one poll by the pipeline before the step, then one per module
