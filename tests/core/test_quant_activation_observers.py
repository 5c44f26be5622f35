"""Activation observers on synthetic data: minmax exact, percentile clips tails, mse and histogram sane; qparams."""

import pytest
import torch

from core.compression.int8.observers import RangeStats, choose_range, qparams

BINS = 2048


def observed(*batches: torch.Tensor) -> RangeStats:
    stats = RangeStats()
    for batch in batches:
        stats.observe_range(batch)
    for batch in batches:
        stats.observe_histogram(batch, BINS)
    return stats


def quantization_mse(x: torch.Tensor, low: float, high: float) -> float:
    scale, zero_point = qparams(low, high)
    decoded = (torch.clamp(torch.round(x / scale) + zero_point, 0, 255) - zero_point) * scale
    return ((decoded - x) ** 2).mean().item()


def laplace(count: int, seed: int = 0) -> torch.Tensor:
    """Heavy-tailed, like transformer activations: the max is far out in a thin tail."""
    uniform = torch.rand(count, generator=torch.Generator().manual_seed(seed)) - 0.5
    return -torch.sign(uniform) * torch.log1p(-2 * uniform.abs())


def test_minmax_is_the_exact_range_over_all_batches() -> None:
    stats = observed(torch.tensor([[0.5, -1.25], [3.0, 0.0]]), torch.tensor([2.0, -0.75]))
    assert choose_range(stats, "minmax") == (-1.25, 3.0)


def test_minmax_range_always_contains_zero() -> None:
    assert choose_range(observed(torch.tensor([2.0, 5.0])), "minmax") == (0.0, 5.0)


def test_percentile_clips_outliers_at_the_requested_tail_mass() -> None:
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    x[:4] = torch.tensor([60.0, -50.0, 45.0, -70.0])
    low, high = choose_range(observed(x), "percentile", percentile=99.9)
    bin_width = 130.0 / BINS
    assert abs(high - torch.quantile(x[:100_000], 0.999).item()) < 0.1 + bin_width
    assert abs(low - torch.quantile(x[:100_000], 0.001).item()) < 0.1 + bin_width
    low, high = choose_range(observed(x), "percentile", percentile=100.0)
    assert low <= -70.0 + bin_width and high >= 60.0 - bin_width


def test_mse_observer_clips_a_thin_tail_inside_the_exact_range() -> None:
    stats = observed(laplace(200_000))
    low, high = choose_range(stats, "mse")
    assert stats.low <= low < 0 < high < stats.high


def test_histogram_observer_clips_an_outlier_but_keeps_the_bulk() -> None:
    x = laplace(200_000)
    x[0] = 200.0
    stats = observed(x)
    low, high = choose_range(stats, "histogram")
    assert stats.low <= low < 0
    assert torch.quantile(x[:100_000], 0.999).item() < high < 0.5 * stats.high


def test_mse_observer_has_less_quantization_error_than_minmax_and_percentile() -> None:
    x = laplace(200_000, seed=1)
    x[0] = 200.0  # one huge outlier: minmax wastes the grid on it
    stats = observed(x)
    errors = {name: quantization_mse(x, *choose_range(stats, name)) for name in ("minmax", "percentile", "mse")}
    assert errors["mse"] <= min(errors.values()) * 1.01


def test_histogram_observer_keeps_a_range_resolving_the_bulk() -> None:
    x = laplace(200_000, seed=2)
    low, high = choose_range(observed(x), "histogram")
    assert high > torch.quantile(x[:100_000], 0.99).item()  # keeps at least the bulk of the distribution


def test_searching_observers_need_the_histogram_pass() -> None:
    stats = RangeStats()
    stats.observe_range(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="histogram"):
        choose_range(stats, "mse")


def test_qparams_golden_values() -> None:
    assert qparams(-1.0, 3.0) == (4.0 / 255, 64)
    assert qparams(0.0, 2.55) == pytest.approx((0.01, 0))
    assert qparams(-1.27, 0.0, reduce_range=True) == pytest.approx((0.01, 127))
    assert qparams(0.0, 0.0) == (1.0, 0)  # an all-zero input still gets a usable scale
