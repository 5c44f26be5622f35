"""Mixed precision: the greedy width choice, the budget, and the per-layer report."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from core.compression.configs.quantize import QuantizeMixed
from core.compression.metrics import model_outputs
from core.compression.quant.weights import selected_weights
from core.compression.select import SharedWeight
from core.compression.state import ModelState, StepContext
from core.compression.steps.quantize_mixed import _Progress, _scan, choose_bits, whole_model_sensitivities
from core.errors import JobCancelled
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


def _scan_setup(layers: int = 4) -> tuple[ModelState, list[SharedWeight], QuantizeMixed, torch.Tensor]:
    config = QuantizeMixed(bits=[4, 8], granularity="per_group", group_size=16, targets=["*", "lm_head"],
                           calibration={"num_samples": 4, "seq_len": 32})
    model = _llama(layers)
    state = ModelState(model=model)
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    return state, selected_weights(model, config), config, ids


def _llama(layers: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_block_local_scan_ranks_weights_as_the_whole_model_scan_does() -> None:
    state, weights, config, ids = _scan_setup()
    before = {name: tensor.clone() for name, tensor in state.model.state_dict().items()}
    local = _scan(state, weights, config, ids, StepContext())
    assert all(torch.equal(tensor, state.model.state_dict()[name]) for name, tensor in before.items())
    reference = model_outputs(state.model, {"input_ids": ids})
    whole = whole_model_sensitivities(state, weights, config, ids, reference, _Progress(StepContext(), len(weights)))
    names = [shared.name for shared in weights]
    assert len(names) == 4 * 7 + 1  # seven Linears per block, and the tied embedding measured on the whole model
    assert local["model.embed_tokens.weight"] == whole["model.embed_tokens.weight"]
    assert _rank_correlation([whole[name][4] for name in names], [local[name][4] for name in names]) > 0.8
    sizes = {shared.name: shared.weight.numel() for shared in weights}
    same = [choose_bits(sizes, whole, [4, 8], 5.0)[name] == choose_bits(sizes, local, [4, 8], 5.0)[name]
            for name in names]
    assert sum(same) >= 0.8 * len(names)


def _rank_correlation(a: list[float], b: list[float]) -> float:
    """Spearman's rho (no ties in these scans)."""
    ranks = [torch.tensor(values).argsort().argsort().double() for values in (a, b)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


def test_block_local_scan_runs_the_model_once_per_block_not_once_per_weight_and_width() -> None:
    state, weights, config, ids = _scan_setup()
    forwards = []
    state.model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    _scan(state, weights, config, ids, StepContext())
    # the reference, the capture of the first block's inputs, one per block (its scale) and the embedding's widths
    assert len(forwards) == 1 + 1 + 4 + 2
    assert len(forwards) < len(weights) * len(config.bits) / 5


def test_scan_is_cancelled_between_weights_and_reports_progress() -> None:
    state, weights, config, ids = _scan_setup(layers=2)
    progress: list[float] = []
    _scan(state, weights, config, ids, StepContext(report=lambda fraction, message: progress.append(fraction)))
    assert len(progress) == len(weights) and progress == sorted(progress) and progress[-1] == pytest.approx(0.9)
    calls = iter(range(100))
    with pytest.raises(JobCancelled, match="before model.layers.0"):
        _scan(state, weights, config, ids, StepContext(should_stop=lambda: next(calls) >= 3))
