"""Unstructured and N:M pruning (magnitude, Wanda, SparseGPT) on tiny models: exact sparsity, patterns, sparse
storage, composition with quantization, and validation of bad parameters."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from core.compression.configs.prune import PruneMagnitude
from core.compression.encoding import decode, quantize_rtn
from core.compression.metrics import probe_inputs
from core.compression.pipeline import run_pipeline
from core.compression.sparsity import unstructured
from core.compression.sparsity.masks import SPARSE_BITMASK, keep_sparse, mask_of, pack_bits, unpack_bits
from core.compression.spec import JobSpec, QuantizeRTN
from core.compression.state import ModelState, StepContext
from core.errors import InvalidSpec
from tests.core.pruning_helpers import assert_reload_identical, outputs, reloaded, run_steps
from tests.models import tiny_bert, tiny_llama

CALIBRATION = {"calibration": {"num_samples": 4, "seq_len": 32}}
METHODS = [{"method": "magnitude"}, {"method": "magnitude", "scope": "global"},
           {"method": "wanda", **CALIBRATION}, {"method": "sparsegpt", **CALIBRATION}]


def linear_weights(model: nn.Module, skip: str = "pooler") -> dict[str, torch.Tensor]:
    return {f"{n}.weight": m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear) and skip not in n
            and m.weight is not getattr(getattr(model, "model", model), "embed_tokens", nn.Linear(1, 1)).weight}


@pytest.mark.parametrize("fields", METHODS)
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_unstructured_sparsity_is_exact(fields: dict, sparsity: float) -> None:
    state, [report] = run_steps(tiny_llama(), {"type": "prune", "sparsity": sparsity, **fields})
    weights = linear_weights(state.model)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    assert zeros / total == pytest.approx(sparsity, abs=8e-3)  # Wanda rounds per row
    assert report.metrics["sparsity"] == pytest.approx(zeros / total)
    if fields.get("scope") != "global":  # per layer (and per row for Wanda): every tensor hits the target
        for weight in weights.values():
            assert float((weight == 0).float().mean()) == pytest.approx(sparsity, abs=1 / weight.shape[1])


@pytest.mark.parametrize("fields", METHODS[:1] + METHODS[2:])
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_n_m_pattern_holds_in_every_group(fields: dict, pattern: str) -> None:
    keep, group = map(int, pattern.split(":"))
    state, [report] = run_steps(tiny_bert(), {"type": "prune", "pattern": pattern, **fields})
    for name, weight in linear_weights(state.model).items():
        nonzero_per_group = (weight.reshape(-1, group) != 0).sum(dim=1)
        assert int(nonzero_per_group.max()) <= keep, name
        assert state.encodings[name].format == SPARSE_BITMASK
    assert report.metrics["sparsity"] == pytest.approx(1 - keep / group, abs=1e-3)


def test_calibrated_methods_beat_magnitude_on_the_outputs() -> None:
    reference = tiny_llama()
    inputs = probe_inputs(reference)
    expected = outputs(reference, inputs)
    errors = {}
    for fields in (METHODS[0], METHODS[3]):
        calibrated = {"type": "prune", "sparsity": 0.5, **fields, "calibration": {"num_samples": 16, "seq_len": 32}}
        step = calibrated if fields["method"] != "magnitude" else {"type": "prune", **fields}
        state, _ = run_steps(tiny_llama(), step)
        errors[fields["method"]] = float((outputs(state.model, inputs) - expected).pow(2).mean())
    assert errors["sparsegpt"] < errors["magnitude"]


def test_sparse_storage_round_trip_is_bit_exact_and_smaller(tmp_path: Path) -> None:
    state, [report] = run_steps(tiny_bert(), {"type": "prune", "sparsity": 0.5})
    for name, encoding in state.encodings.items():
        assert torch.equal(decode(encoding), state.model.get_parameter(name))
    assert report.metrics["stored_ratio"] < 0.55  # half the values + 1 bit per weight
    assert any("no speedup" in note for note in report.notes)
    assert_reload_identical(state, tmp_path, probe_inputs(state.model))


def test_bits_pack_and_unpack() -> None:
    mask = torch.rand(7, 13, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_bits(packed, mask.shape), mask)


@pytest.mark.parametrize("symmetric", [True, False])
def test_quantizing_a_pruned_weight_keeps_its_zeros_and_its_sparse_storage(symmetric: bool) -> None:
    state, _ = run_steps(tiny_bert(), {"type": "prune", "sparsity": 0.5})
    name = "encoder.layer.0.intermediate.dense.weight"
    weight, mask = state.model.get_parameter(name), mask_of(state, name)
    dense = quantize_rtn(weight, symmetric=symmetric)
    encoding = keep_sparse(state, name, dense)
    decoded = decode(encoding)
    assert torch.equal(decoded == 0, ~mask | (decoded == 0))
    assert bool((decoded[~mask] == 0).all())
    # int8 codes of the kept half + 1 bit per weight, scales unchanged
    assert encoding.nbytes() == dense.nbytes() - int((~mask).sum()) + mask.numel() // 8
    assert mask_of(state, "embeddings.word_embeddings.weight") is None


def test_prune_then_quantize_then_huffman_reloads_identically(tmp_path: Path) -> None:
    state, reports = run_steps(tiny_llama(), {"type": "prune"}, {"type": "quantize", "include_embeddings": True},
                              {"type": "encode"})
    assert reports[2].metrics["stored_bytes"] < reports[2].metrics["original_bytes"]
    assert_reload_identical(state, tmp_path, probe_inputs(state.model))


def test_pruning_an_already_packed_weight_is_refused() -> None:
    # JobSpec already rejects this order at submission; the step itself refuses too, for direct callers.
    with pytest.raises(InvalidSpec, match="must run before"):
        run_pipeline(ModelState(tiny_bert()), [QuantizeRTN(), PruneMagnitude()], StepContext())


def test_embeddings_are_pruned_only_when_asked(tmp_path: Path) -> None:
    state, _ = run_steps(tiny_llama(), {"type": "prune", "include_embeddings": True})
    assert "model.embed_tokens.weight" in state.encodings
    assert float((state.model.lm_head.weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
    loaded = reloaded(state, tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


@pytest.mark.parametrize(
    ("step", "field"),
    [
        ({"type": "prune", "sparsity": 1.5}, "sparsity"),
        ({"type": "prune", "sparsity": 0}, "sparsity"),
        ({"type": "prune", "method": "wanda", "pattern": "3:2"}, "pattern"),
        ({"type": "prune", "method": "sparsegpt", "pattern": "2-4"}, "pattern"),
        ({"type": "prune", "pattern": "2:4", "sparsity": 0.3}, "sparsity"),
        ({"type": "prune", "method": "structured", "target": "experts"}, "target"),
        ({"type": "prune", "method": "structured", "amount": 1}, "amount"),
        ({"type": "prune", "method": "structured", "importance": "random"}, "importance"),
        ({"type": "prune", "method": "wanda", "calibration": {"num_samples": 0}}, "num_samples"),
        ({"type": "prune", "method": "snip"}, "type"),
    ],
)
def test_invalid_parameters_name_the_field(step: dict, field: str) -> None:
    with pytest.raises(ValidationError) as raised:
        JobSpec.model_validate({"steps": [step]})
    assert field in str(raised.value)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_block_reconstruction_lowers_the_error_and_keeps_the_mask(method: str, tmp_path: Path) -> None:
    reference = tiny_llama()
    inputs = probe_inputs(reference)
    expected = outputs(reference, inputs)
    step = {"type": "prune", "method": method, "sparsity": 0.6, "calibration": {"num_samples": 16, "seq_len": 32}}
    one_shot, _ = run_steps(tiny_llama(), step)
    rebuilt, [report] = run_steps(tiny_llama(), {**step, "reconstruct": {"epochs": 4, "lr": 1e-3}})
    for name, weight in linear_weights(rebuilt.model).items():
        one_shot_weight = one_shot.model.get_parameter(name)
        assert int((weight == 0).sum()) == int((one_shot_weight == 0).sum()), name  # pruned weights stay zero
        if ".layers.0." in name:  # the first block sees the same inputs, so the same mask
            assert torch.equal(weight == 0, one_shot_weight == 0), name
        assert torch.equal(decode(rebuilt.encodings[name]), weight)  # the stored weights are the trained ones
    assert report.metrics["reconstruction_error_ratio"] < 0.9
    assert report.metrics["reconstruction_blocks_kept"] >= 1
    errors = [float((outputs(s.model, inputs) - expected).pow(2).mean()) for s in (one_shot, rebuilt)]
    assert errors[1] < errors[0]
    assert_reload_identical(rebuilt, tmp_path, inputs)


def test_reconstruction_is_refused_for_magnitude_pruning() -> None:
    with pytest.raises(ValidationError, match="reconstruct"):
        PruneMagnitude.model_validate({"type": "prune", "method": "magnitude", "reconstruct": {"epochs": 1}})


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("stored", ["float32", "bfloat16 upcast", "with exact zeros"])
def test_the_streamed_global_threshold_is_kthvalue_of_all_the_magnitudes(sparsity: float, stored: str) -> None:
    generator = torch.Generator().manual_seed(int(sparsity * 1000))
    tensors = [torch.randn(size, generator=generator).abs() for size in (1, 700, 4096, 33)]
    if stored == "bfloat16 upcast":  # many equal values: ties at the rank
        tensors = [t.bfloat16().float() for t in tensors]
    if stored == "with exact zeros":
        tensors.append(torch.zeros(500))
    flat = torch.cat(tensors)
    rank = round(sparsity * flat.numel())
    expected = float(torch.kthvalue(flat, rank).values) if rank else float("-inf")
    passes = []

    def magnitudes() -> Iterator[torch.Tensor]:
        passes.append(1)
        return iter(tensors)

    assert unstructured.global_threshold(magnitudes, sparsity) == expected
    assert len(passes) == (2 if rank else 1)  # never all of them at once
