"""Named presets: each expands to a valid job, overrides merge into the steps that take them, and the defaults a
bare step falls back on do not hurt a causal LM (its head and tied embedding stay float, and the notes say so)."""

import copy

import pytest
import torch
from pydantic import ValidationError

from core.compression.configs.distill import StudentLayers
from core.compression.presets import PRESETS, expand_preset, preset_job
from core.compression.spec import JobSpec, config_class
from core.errors import InvalidSpec
from tests.core.quant_helpers import quantize_with
from tests.core.training_helpers import run
from tests.models import tiny_llama

BARE_GPTQ = {"method": "gptq", "bits": 4, "granularity": "per_group", "group_size": 128}
TIED = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_a_valid_job(name: str) -> None:
    preset = PRESETS[name]
    spec = JobSpec.model_validate(preset_job(name))
    assert [step.type for step in spec.steps] == [step["type"] for step in preset.steps]
    assert all(config_class(step) is not None for step in preset.steps)
    assert spec.export == preset.export
    assert preset.summary and "bench." in preset.measured  # the benchmark its figure comes from


def test_the_issues_presets_are_all_there() -> None:
    assert {"w8a16-rtn", "w4a16-gptq", "w8a8-smoothquant", "int8-cpu-dynamic", "sparse50-sparsegpt",
            "2of4-sparsegpt", "half-depth-distill", "deep-compression", "gguf-q4", "gguf-q8"} <= set(PRESETS)


def test_overrides_merge_into_the_steps_that_take_them() -> None:
    [step] = expand_preset("sparse50-sparsegpt", {"calibration": {"dataset_id": "dst_1"}})
    assert step["calibration"] == {"num_samples": 64, "seq_len": 512, "dataset_id": "dst_1"}
    deep = expand_preset("deep-compression", {"dataset_id": "dst_2"})
    assert [step.get("dataset_id") for step in deep] == [None, "dst_2", None, "dst_2", None, None, "dst_2", None]
    assert "dataset_id" not in PRESETS["deep-compression"].steps[1]  # the preset itself is left as it was


def test_an_unknown_preset_or_an_override_no_step_takes_is_refused() -> None:
    with pytest.raises(InvalidSpec, match="unknown preset 'w3'"):
        expand_preset("w3")
    with pytest.raises(InvalidSpec, match="no step that takes sparsity"):
        expand_preset("gguf-q8", {"sparsity": 0.5})


def test_a_student_keeps_a_number_or_a_fraction_of_the_layers() -> None:
    assert StudentLayers(fraction=0.5).count(6) == 3 and StudentLayers(fraction=0.5).count(30) == 15
    assert StudentLayers(layers=4).count(30) == 4 and StudentLayers(fraction=0.1).count(4) == 1
    for fields in ({}, {"layers": 3, "fraction": 0.5}, {"fraction": 1.0}):
        with pytest.raises(ValidationError):
            StudentLayers(**fields)


def test_half_depth_distill_halves_a_causal_lm_and_trains_it() -> None:
    steps = expand_preset("half-depth-distill", {"max_steps": 4, "batch_size": 2, "seq_len": 16})
    state, [report] = run(tiny_llama(), steps)
    assert len(state.model.model.layers) == state.model.config.num_hidden_layers == 1
    assert [(r.kind, r.meta["keep"]) for r in state.rewrites] == [("keep_layers", [1])]
    assert report.metrics["train_loss_first"] > 0


@pytest.mark.parametrize("step", [BARE_GPTQ, {**expand_preset("w4a16-gptq")[0], "calibration": {"num_samples": 4}}],
                         ids=["bare gptq", "w4a16-gptq"])
def test_gptq_leaves_a_causal_lms_head_and_tied_embedding_float_and_says_why(step: dict) -> None:
    model = tiny_llama()
    original = copy.deepcopy(model.state_dict())
    state, report = quantize_with(model, **{key: value for key, value in step.items() if key != "type"})
    for name in TIED:
        assert name not in state.encodings
        assert torch.equal(state.model.get_parameter(name), original[name]), name
    assert state.model.lm_head.weight is state.model.model.embed_tokens.weight
    linears = {f"{name}.weight" for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and name != "lm_head"}
    assert set(state.encodings) == linears and report.metrics["gptq_tensors"] == len(linears)
    [note] = [note for note in report.notes if note.startswith("left as they were")]
    assert "model.embed_tokens and lm_head" in note and "output head" in note and '"lm_head" to targets' in note


def test_naming_the_head_quantizes_it_with_the_tied_embedding() -> None:
    state, report = quantize_with(tiny_llama(), **BARE_GPTQ, targets=["*", "lm_head"], include_embeddings=True,
                                  calibration={"num_samples": 4, "seq_len": 16})
    assert "model.embed_tokens.weight" in state.encodings
    assert not any(note.startswith("left as they were") for note in report.notes)
