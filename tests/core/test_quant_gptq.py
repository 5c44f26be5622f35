"""GPTQ: reduces to round-to-nearest without correlations, beats it with them, and on tiny models with data."""

from pathlib import Path

import pytest
import torch
from torch import nn

from core.compression.encoding import decode, quantize_rtn
from core.compression.metrics import probe_inputs
from core.compression.quant.gptq import gptq_quantize, refitted_scales
from core.compression.quant.grid import IntGrid, dequantize_codes, grid_params, quantize_codes, searched_grid_params
from tests.core.pruning_helpers import assert_reload_identical, outputs, run_steps
from tests.core.quant_helpers import cosine_vs_fp32, quantize_with
from tests.models import tiny_bert, tiny_llama, tiny_tokenizer

GRID = IntGrid(bits=4, symmetric=True, granularity="per_group", group_size=16)


def output_error(weight: torch.Tensor, quantized: torch.Tensor, inputs: torch.Tensor) -> float:
    return float(((weight - quantized) @ inputs.T).norm())


def test_without_input_correlation_gptq_is_round_to_nearest() -> None:
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    codes, params = gptq_quantize(weight, torch.eye(32), GRID, dampening=0.01)
    assert torch.equal(dequantize_codes(codes, params, GRID), decode(quantize_rtn(weight, 4, "per_group", True, 16)))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("grid", [GRID, IntGrid(3, False, "per_channel"), IntGrid(8, True, "per_group", 16)])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(grid: IntGrid, act_order: bool) -> None:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(512, 8, generator=generator) @ torch.randn(8, 32, generator=generator)  # rank 8 inputs
    inputs += 0.05 * torch.randn(512, 32, generator=generator)
    weight = torch.randn(24, 32, generator=generator)
    codes, params = gptq_quantize(weight, inputs.T @ inputs, grid, block_columns=8, act_order=act_order)
    assert codes.dtype == torch.uint8 and codes.shape == weight.shape and int(codes.max()) <= grid.levels
    rtn = decode(quantize_rtn(weight, grid.bits, grid.granularity, grid.symmetric, grid.group_size))
    gptq = dequantize_codes(codes, params, grid)
    assert output_error(weight, gptq, inputs) < 0.7 * output_error(weight, rtn, inputs)


def test_inputs_that_are_always_zero_get_zero_weights() -> None:
    weight = torch.ones(4, 16)
    inputs = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    inputs[:, 3] = 0
    codes, params = gptq_quantize(weight, inputs.T @ inputs, GRID)
    assert torch.equal(dequantize_codes(codes, params, GRID)[:, 3], torch.zeros(4))


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama])
def test_gptq_step_beats_rtn_on_tiny_models_with_calibration(build) -> None:
    fields = {"bits": 3, "granularity": "per_channel", "include_embeddings": False, "exclude": ["lm_head", "pooler*"]}
    # Random token ids, like the probe inputs: the tiny word-level tokenizer would turn Wikipedia into [UNK]s.
    calibration = {"num_samples": 8, "seq_len": 32}
    state, report = quantize_with(build(), method="gptq", calibration=calibration, **fields)
    rtn_state, _ = quantize_with(build(), **fields)
    assert report.metrics["gptq_tensors"] == report.metrics["tensors_quantized"] > 10
    assert report.metrics["gptq_vs_rtn_output_error"] < 0.9
    assert cosine_vs_fp32(build(), state.model) > cosine_vs_fp32(build(), rtn_state.model)
    assert any("8 x 32 seeded random token ids" in note for note in report.notes)


def test_gptq_calibrates_on_text_through_the_models_tokenizer() -> None:
    calibration = {"num_samples": 2, "seq_len": 16}
    _, report = quantize_with(tiny_bert(), tiny_tokenizer(), method="gptq", calibration=calibration)
    assert report.metrics["calibration_tokens"] == 32
    assert "calibrated on 2 x 16 tokens of text" in report.notes


def test_weights_outside_blocks_fall_back_to_rtn_and_say_so() -> None:
    state, report = quantize_with(tiny_llama(), method="gptq", calibration={"num_samples": 4, "seq_len": 16},
                                  include_embeddings=True)
    assert report.metrics["rtn_tensors"] == 1  # the tied embedding / lm_head, named by include_embeddings
    assert any("model.embed_tokens.weight" in note and "round-to-nearest" in note for note in report.notes)
    assert any("seeded random token ids" in note for note in report.notes)
    assert {encoding.format for encoding in state.encodings.values()} == {"packed_int"}


def test_clip_search_never_rounds_worse_and_wins_on_heavy_tails() -> None:
    weight = heavy_tailed(16, 64)
    grid = IntGrid(4, False, "per_group", 32)
    plain, searched = grid_params(weight, grid), searched_grid_params(weight, grid)
    plain_error = (dequantize_codes(quantize_codes(weight, plain, grid), plain, grid) - weight).square()
    searched_error = (dequantize_codes(quantize_codes(weight, searched, grid), searched, grid) - weight).square()
    per_group = [(e.view(16, 2, 32).sum(dim=2)) for e in (plain_error, searched_error)]
    assert bool((per_group[1] <= per_group[0] + 1e-6).all())
    assert float(searched_error.sum()) < 0.97 * float(plain_error.sum())


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_clip_search_beats_round_to_nearest(act_order: bool) -> None:
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(256, 8, generator=generator) @ torch.randn(8, 64, generator=generator)  # correlated
    weight, inputs = heavy_tailed(16, 64), inputs + 0.05 * torch.randn(256, 64, generator=generator)
    grid = IntGrid(4, False, "per_group", 32)
    codes, params = gptq_quantize(weight, inputs.T @ inputs, grid, act_order=act_order, clip_search=True)
    rtn = decode(quantize_rtn(weight, 4, "per_group", False, 32))
    assert output_error(weight, dequantize_codes(codes, params, grid), inputs) < 0.7 * output_error(weight, rtn, inputs)


def heavy_tailed(rows: int, columns: int) -> torch.Tensor:
    """Gaussian weights with a few large outliers, which stretch min/max ranges."""
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(rows, columns, generator=generator)
    outliers = torch.rand(rows, columns, generator=generator) < 0.02
    return torch.where(outliers, weight * 8, weight)


def test_a_full_range_grid_puts_each_groups_extreme_on_the_lowest_code_and_rounds_finer() -> None:
    torch.manual_seed(0)
    weight = torch.randn(64, 128)
    weight[0, :32] = torch.linspace(-1, 3, 32)  # the extreme is positive: its scale is negative
    narrow, full = IntGrid(4, True, "per_group", 32), IntGrid(4, True, "per_group", 32, full_range=True)
    full_params = grid_params(weight, full)
    codes = quantize_codes(weight, full_params, full)
    assert full_params.scale[0, 0] < 0 and codes[0, 31] == 0 and int(codes.max()) <= 15
    assert float(dequantize_codes(codes, full_params, full)[0, 31]) == pytest.approx(3.0, rel=1e-3)
    narrow_codes = quantize_codes(weight, grid_params(weight, narrow), narrow)
    assert bool((codes == 0).any()) and not bool((narrow_codes == 0).any())

    def error(grid: IntGrid) -> float:
        params = grid_params(weight, grid)
        return float((dequantize_codes(quantize_codes(weight, params, grid), params, grid) - weight).square().mean())

    assert error(full) < 0.85 * error(narrow)  # 16 levels instead of 15 over the same range


def test_gptq_keeps_full_range_codes_and_refuses_it_asymmetric() -> None:
    torch.manual_seed(0)
    weight, inputs = torch.randn(32, 64), torch.randn(256, 64)
    grid = IntGrid(4, True, "per_group", 32, full_range=True)
    codes, params = gptq_quantize(weight, inputs.T @ inputs, grid, act_order=True, clip_search=True)
    assert int(codes.min()) == 0 and bool((params.scale < 0).any())
    with pytest.raises(ValueError, match="symmetric"):
        IntGrid(4, False, "per_group", 32, full_range=True)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("grid", [IntGrid(4, False, "per_group", 32), IntGrid(3, True, "per_channel"),
                                  IntGrid(4, True, "per_group", 32, full_range=True)])
def test_refitted_scales_lower_the_output_error_and_keep_the_format(grid: IntGrid, act_order: bool) -> None:
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(512, 8, generator=generator) @ torch.randn(8, 96, generator=generator)  # correlated
    inputs = inputs + 0.05 * torch.randn(512, 96, generator=generator)
    weight, hessian = heavy_tailed(24, 96), inputs.T @ inputs
    base_codes, base = gptq_quantize(weight, hessian, grid, act_order=act_order, clip_search=True)
    one_codes, one = gptq_quantize(weight, hessian, grid, act_order=act_order, clip_search=True, refit_rounds=1)
    _, two = gptq_quantize(weight, hessian, grid, act_order=act_order, clip_search=True, refit_rounds=2)
    assert torch.equal(one_codes, base_codes)  # one round moves the scales only
    assert one.scale.dtype == torch.float16 and one.scale.shape == base.scale.shape
    assert bool((torch.sign(one.scale) == torch.sign(base.scale)).all())  # a full-range scale keeps its sign
    assert (one.zero_point is None) == (base.zero_point is None)
    if base.zero_point is not None:
        assert torch.equal(one.zero_point, base.zero_point)
    errors = [output_error(weight, dequantize_codes(codes, params, grid), inputs)
              for codes, params in [(base_codes, base), (one_codes, one)]]
    assert errors[1] < 0.99 * errors[0]


def test_refitted_scales_solve_the_least_squares_problem_exactly() -> None:
    # With the codes fixed, a row's decoded weight is linear in its scales: compare with torch.linalg.lstsq on X.
    generator = torch.Generator().manual_seed(6)
    inputs, weight = torch.randn(300, 64, generator=generator), torch.randn(3, 64, generator=generator)
    grid = IntGrid(4, False, "per_group", 16)
    params = grid_params(weight, grid)
    codes = quantize_codes(weight, params, grid)
    fitted = refitted_scales(weight, inputs.T @ inputs, codes, params, grid, dampening=1e-9)
    centred = codes.float() - params.zero_point.float().repeat_interleave(16, dim=1)
    for row in range(3):
        basis = torch.stack([torch.where(torch.arange(64) // 16 == g, centred[row], 0.0) for g in range(4)], dim=1)
        exact = torch.linalg.lstsq((inputs @ basis).double(), (inputs @ weight[row]).double()[:, None]).solution
        assert torch.allclose(fitted.scale[row].float(), exact[:, 0].float(), rtol=2e-3)


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama])
def test_block_tuning_of_gptq_scales_lowers_the_error_and_keeps_the_codes(build, tmp_path: Path) -> None:
    reference = build()
    inputs = probe_inputs(reference)
    expected = outputs(reference, inputs)
    step = {"type": "quantize", "method": "gptq", "bits": 3, "group_size": 16, "include_embeddings": False,
            "exclude": ["lm_head", "pooler*"], "calibration": {"num_samples": 16, "seq_len": 32}}
    one_shot, _ = run_steps(build(), step)
    tuned, [report] = run_steps(build(), {**step, "reconstruct": {"epochs": 4, "lr": 1e-2}})
    assert report.metrics["reconstruction_error_ratio"] < 0.9
    assert report.metrics["reconstruction_blocks_kept"] >= 1
    errors = [float((outputs(s.model, inputs) - expected).pow(2).mean()) for s in (one_shot, tuned)]
    assert errors[1] < 0.9 * errors[0]
    for name, encoding in tuned.encodings.items():
        before = one_shot.encodings[name]
        if ".0." not in name:  # later blocks see the tuned blocks' outputs, so GPTQ picks other codes there
            continue
        assert torch.equal(encoding.tensors["qweight"], before.tensors["qweight"])
        ratio = encoding.tensors["scale"].float() / before.tensors["scale"].float()
        assert ratio.min() >= 0.5 and ratio.max() <= 2.0
    assert any(not torch.equal(e.tensors["scale"], one_shot.encodings[n].tensors["scale"])
               for n, e in tuned.encodings.items())
    assert all(isinstance(p, nn.Parameter) for p in tuned.model.parameters())  # parametrizations removed
    assert not any("parametrizations" in name for name, _ in tuned.model.named_parameters())
    assert_reload_identical(tuned, tmp_path, inputs)
