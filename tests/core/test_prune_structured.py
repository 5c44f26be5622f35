"""Structured pruning physically shrinks tiny BERT, Llama and CNN models, which stay runnable and load back."""

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from core.compression.configs.prune import PruneStructured
from core.compression.metrics import probe_inputs
from core.compression.pipeline import run_pipeline
from core.compression.spec import QuantizeRTN
from core.compression.state import ModelState, StepContext
from core.errors import InvalidSpec
from tests.core.pruning_helpers import assert_reload_identical, outputs, run_steps
from tests.core.vision import images, tiny_cnn
from tests.models import tiny_bert, tiny_llama

IMPORTANCE = [{"importance": "l1"}, {"importance": "activation", "calibration": {"num_samples": 2, "seq_len": 16}},
              {"importance": "taylor", "calibration": {"num_samples": 2, "seq_len": 16}}]


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("importance", IMPORTANCE)
def test_bert_heads_and_neurons_shrink_and_reload(tmp_path: Path, importance: dict) -> None:
    model = tiny_bert()
    before = count(model)
    state, reports = run_steps(model, {"type": "prune", "method": "structured", "target": "heads", **importance},
                               {"type": "prune", "method": "structured", "target": "neurons", "amount": 0.25,
                                **importance})
    layer = model.encoder.layer[0]
    assert layer.attention.self.query.out_features == 32 and layer.attention.self.num_attention_heads == 2
    assert layer.attention.output.dense.in_features == 32
    assert layer.intermediate.dense.out_features == 96 and layer.output.dense.in_features == 96
    assert reports[-1].metrics["params_after"] == count(model) < before
    loaded = assert_reload_identical(state, tmp_path, probe_inputs(model))
    assert loaded.encoder.layer[1].intermediate.dense.weight.shape == (96, 64)


@pytest.mark.parametrize("importance", IMPORTANCE)
def test_llama_kv_groups_and_neurons_shrink_and_reload(tmp_path: Path, importance: dict) -> None:
    model = tiny_llama()
    state, _ = run_steps(model, {"type": "prune", "method": "structured", "target": "heads", **importance},
                         {"type": "prune", "method": "structured", "target": "neurons", **importance})
    attention = model.model.layers[0].self_attn
    # 4 query heads share 2 KV heads: half the KV heads go with their query heads, so the groups stay intact.
    assert (attention.q_proj.out_features, attention.k_proj.out_features, attention.o_proj.in_features) == (32, 16, 32)
    assert model.model.layers[0].mlp.down_proj.in_features == 64
    assert_reload_identical(state, tmp_path, probe_inputs(model))
    generated = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama])
@pytest.mark.parametrize("importance", IMPORTANCE)
def test_whole_blocks_are_removed(tmp_path: Path, build: Callable[[], nn.Module], importance: dict) -> None:
    model = build()
    state, [report] = run_steps(model, {"type": "prune", "method": "structured", "target": "layers", **importance})
    _, blocks = max(((n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)),
                    key=lambda item: count(item[1]))
    assert len(blocks) == 1
    assert any("removed blocks" in note for note in report.notes)
    assert_reload_identical(state, tmp_path, probe_inputs(model))


def test_removed_llama_blocks_keep_generation_working() -> None:
    model = tiny_llama()
    run_steps(model, {"type": "prune", "method": "structured", "target": "layers"})
    assert model.model.layers[0].self_attn.layer_idx == 0
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


@pytest.mark.parametrize("importance", IMPORTANCE)
def test_cnn_inner_channels_shrink_and_reload(tmp_path: Path, importance: dict) -> None:
    model = tiny_cnn()
    state, [report] = run_steps(model, {"type": "prune", "method": "structured", "target": "channels", **importance})
    block = model.resnet.encoder.stages[1].layers[0].layer
    assert block[0].convolution.out_channels == 8 and block[0].normalization.num_features == 8
    assert block[1].convolution.in_channels == 8 and block[1].convolution.out_channels == 16  # residual width kept
    assert report.metrics["params_ratio"] < 0.7
    assert_reload_identical(state, tmp_path, images())


def test_activation_importance_keeps_more_of_the_output_than_random_choice() -> None:
    reference, inputs = tiny_cnn(), images(8)
    expected = outputs(reference, inputs)
    state, _ = run_steps(tiny_cnn(), {"type": "prune", "method": "structured", "target": "channels",
                                      "importance": "activation", "calibration": {"num_samples": 8, "seq_len": 16}})
    cosine = torch.nn.functional.cosine_similarity(outputs(state.model, inputs), expected).mean()
    assert cosine > 0.9


def test_missing_units_are_an_invalid_spec() -> None:
    with pytest.raises(InvalidSpec, match="found no channels"):
        run_steps(tiny_bert(), {"type": "prune", "method": "structured", "target": "channels"})
    with pytest.raises(InvalidSpec, match="must run before"):  # JobSpec rejects this order too
        run_pipeline(ModelState(tiny_bert()), [QuantizeRTN(), PruneStructured()], StepContext())
