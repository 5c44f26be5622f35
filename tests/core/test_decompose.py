"""Low-rank decomposition (SVD, ASVD, SVD-LLM) of tiny models: error vs rank, rank rules, Conv2d spatial SVD,
artifacts that reload with the factored shapes, and invalid parameters."""

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from core.compression.metrics import probe_inputs
from core.compression.spec import JobSpec
from tests.core.pruning_helpers import assert_reload_identical, outputs, run_steps
from tests.core.vision import images, tiny_cnn
from tests.models import tiny_bert, tiny_llama

CALIBRATION = {"calibration": {"num_samples": 4, "seq_len": 32}}


def linear_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(48, 32))


def relative_error(original: torch.Tensor, pair: nn.Sequential) -> float:
    product = (pair[1].weight @ pair[0].weight).detach()
    return float((product - original).norm() / original.norm())


def factored(state_model: nn.Module, original: nn.Module, **rule: float) -> tuple[nn.Sequential, torch.Tensor]:
    from core.compression.spec import JobSpec as Spec
    from core.compression.state import ModelState, StepContext
    from core.compression.steps.decompose import decompose_svd_step

    [config] = Spec.model_validate({"steps": [{"type": "decompose", **rule}]}).steps
    decompose_svd_step(ModelState(state_model), config, StepContext())
    return state_model[0], original[0].weight.detach()


def test_svd_error_falls_with_rank_and_matches_the_dropped_singular_values() -> None:
    weight = linear_model()[0].weight.detach()
    singular = torch.linalg.svdvals(weight.double())
    errors = []
    for rank in (2, 8, 16):
        pair, original = factored(linear_model(), linear_model(), rank=rank)
        assert pair[0].weight.shape == (rank, 48) and pair[1].weight.shape == (32, rank)
        errors.append(relative_error(original, pair))
        expected = float(singular[rank:].norm() / singular.norm())  # Eckart–Young: the best rank-r error
        assert errors[-1] == pytest.approx(expected, rel=1e-4)
    assert errors == sorted(errors, reverse=True)


@pytest.mark.parametrize(("rule", "rank"), [({"rank_ratio": 0.25}, 8), ({"params_kept": 0.5}, 9),
                                            ({"energy": 1.0}, None)])
def test_rank_rules(rule: dict, rank: int | None) -> None:
    model = linear_model()
    factored(model, linear_model(), **rule)
    if rank is None:  # all the energy needs full rank, which saves nothing: the layer stays as it is
        assert isinstance(model[0], nn.Linear)
    else:
        assert model[0][0].out_features == rank and rank * (48 + 32) <= 48 * 32


@pytest.mark.parametrize("method", ["svd", "asvd", "svd_llm"])
@pytest.mark.parametrize("build", [tiny_bert, tiny_llama])
def test_factored_models_reload_with_factored_shapes(tmp_path: Path, build, method: str) -> None:
    model = build()
    extra = {} if method == "svd" else CALIBRATION
    state, [report] = run_steps(model, {"type": "decompose", "method": method, "params_kept": 0.6, **extra})
    assert report.metrics["layers_factored"] > 0 and report.metrics["params_after"] < report.metrics["params_before"]
    assert_reload_identical(state, tmp_path, probe_inputs(model))


def test_whitening_beats_plain_svd_on_the_outputs() -> None:
    reference = tiny_llama()
    inputs = probe_inputs(reference)
    expected = outputs(reference, inputs)
    errors = {}
    for method, extra in (("svd", {}), ("svd_llm", {"calibration": {"num_samples": 8, "seq_len": 64}})):
        state, _ = run_steps(tiny_llama(), {"type": "decompose", "method": method, "params_kept": 0.5, **extra})
        errors[method] = float((outputs(state.model, inputs) - expected).pow(2).mean())
    assert errors["svd_llm"] < errors["svd"]


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama])
def test_block_reconstruction_of_factored_layers_lowers_the_error(build, tmp_path: Path) -> None:
    reference = build()
    inputs = probe_inputs(reference)
    expected = outputs(reference, inputs)
    step = {"type": "decompose", "method": "svd_llm", "params_kept": 0.4,
            "calibration": {"num_samples": 16, "seq_len": 32}}
    one_shot, _ = run_steps(build(), step)
    rebuilt, [report] = run_steps(build(), {**step, "reconstruct": {"epochs": 4, "lr": 1e-3}})
    ranks = {name: m[0].out_features for name, m in one_shot.model.named_modules() if isinstance(m, nn.Sequential)}
    assert ranks and ranks == {name: m[0].out_features for name, m in rebuilt.model.named_modules()
                               if isinstance(m, nn.Sequential)}  # the same factor shapes, trained
    assert report.metrics["reconstruction_error_ratio"] < 0.9
    assert report.metrics["reconstruction_blocks_kept"] >= 1
    errors = [float((outputs(s.model, inputs) - expected).pow(2).mean()) for s in (one_shot, rebuilt)]
    assert errors[1] < 0.9 * errors[0]
    assert_reload_identical(rebuilt, tmp_path, inputs)


def test_conv2d_spatial_svd_is_exact_at_full_rank_and_reloads(tmp_path: Path) -> None:
    conv = nn.Conv2d(4, 6, (3, 3), stride=2, padding=1)
    model = nn.Sequential(conv)
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        expected = conv(x)
    factored(model, nn.Sequential(conv), rank=12)  # full rank of the 12 × 18 matrix: 12·(12+18) < 216 params
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5)
    state, [report] = run_steps(tiny_cnn(), {"type": "decompose", "rank_ratio": 0.5})
    assert report.metrics["layers_factored"] > 0
    assert any(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 1) for m in state.model.modules())
    assert_reload_identical(state, tmp_path, images())


@pytest.mark.parametrize(
    ("step", "field"),
    [
        ({"type": "decompose", "rank": 0}, "rank"),
        ({"type": "decompose", "rank_ratio": 1.5}, "rank_ratio"),
        ({"type": "decompose", "params_kept": 1}, "params_kept"),
        ({"type": "decompose", "energy": 0}, "energy"),
        ({"type": "decompose", "rank": 4, "energy": 0.9}, "exactly one"),
        ({"type": "decompose", "method": "asvd", "params_kept": 0.8, "alpha": 2}, "alpha"),
        ({"type": "decompose", "method": "tucker", "rank": 4}, "type"),
        ({"type": "decompose", "method": "svd", "rank": 4, "reconstruct": {"epochs": 1}}, "reconstruct"),
        ({"type": "decompose", "method": "svd_llm", "rank": 4, "reconstruct": {"epochs": 0}}, "epochs"),
    ],
)
def test_invalid_parameters_name_the_field(step: dict, field: str) -> None:
    with pytest.raises(ValidationError) as raised:
        JobSpec.model_validate({"steps": [step]})
    assert field in str(raised.value)
