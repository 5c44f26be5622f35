"""Activation observers: the per-tensor range [low, high] that a static int8 activation quantizer uses.

Every observer first needs the exact minimum and maximum (`RangeStats`); all but `minmax` then need a histogram
of the values over that range (a second pass over the calibration data, so no value is ever dropped or re-binned).
The chosen range always contains 0, so 0.0 is exactly representable (padding, ReLU/GELU zeros).

- minmax: the exact range.
- percentile: cuts `(100 - p) / 100` of the values off each tail.
- mse: the range with the least expected squared quantization error (rounding inside, clipping outside) under the
  histogram, searched over high·t then low·t for t in (0, 1].
- histogram: the same search for the least KL divergence between the calibration histogram and its quantized
  version (TensorRT's entropy calibration, on the signed range).
"""

from dataclasses import dataclass, field
from typing import Literal

import torch

Observer = Literal["minmax", "percentile", "mse", "histogram"]
LEVELS = 256  # uint8 activation codes
CANDIDATES = 128  # range shrink factors t tried by mse and histogram


@dataclass
class RangeStats:
    """What the calibration passes saw at one module input: exact extremes, then an optional histogram."""

    low: float = float("inf")
    high: float = float("-inf")
    histogram: torch.Tensor | None = field(default=None, repr=False)

    def observe_range(self, x: torch.Tensor) -> None:
        low, high = torch.aminmax(x.detach().float())
        self.low, self.high = min(self.low, low.item(), 0.0), max(self.high, high.item(), 0.0)

    def observe_histogram(self, x: torch.Tensor, bins: int) -> None:
        counts = torch.histc(x.detach().float(), bins=bins, min=self.low, max=self._top())
        self.histogram = counts if self.histogram is None else self.histogram + counts

    def _top(self) -> float:
        # histc needs max > min; an all-zero input has the range [0, 0].
        return self.high if self.high > self.low else self.low + 1e-8


def choose_range(stats: RangeStats, observer: Observer, percentile: float = 99.99) -> tuple[float, float]:
    """The [low, high] range (containing 0) that `observer` picks from `stats`."""
    if observer == "minmax":
        return stats.low, stats.high
    if stats.histogram is None:
        raise ValueError(f"observer {observer} needs a histogram pass")
    centers = _bin_centers(stats)
    if observer == "percentile":
        return _percentile_range(stats.histogram, centers, percentile)
    costs = _mse_costs if observer == "mse" else _kl_costs
    # Each end is searched on its own (the top first, then the bottom given the chosen top): one outlier on one
    # side must not force clipping the other side's bulk.
    factors = torch.linspace(1.0 / CANDIDATES, 1.0, CANDIDATES, dtype=torch.float64)
    lows = torch.full_like(factors, stats.low)
    high = stats.high * factors[int(torch.argmin(costs(stats.histogram, centers, lows, stats.high * factors)))]
    highs = torch.full_like(factors, high.item())
    low = stats.low * factors[int(torch.argmin(costs(stats.histogram, centers, stats.low * factors, highs)))]
    return low.item(), high.item()


def qparams(low: float, high: float, reduce_range: bool = False) -> tuple[float, int]:
    """uint8 affine scale and zero point for [low, high] (7-bit codes with `reduce_range`)."""
    top = 127 if reduce_range else LEVELS - 1
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / top if high > low else 1.0
    return scale, int(min(max(round(-low / scale), 0), top))


def _bin_centers(stats: RangeStats) -> torch.Tensor:
    bins = stats.histogram.numel()
    width = (stats._top() - stats.low) / bins
    return stats.low + width * (torch.arange(bins, dtype=torch.float64) + 0.5)


def _percentile_range(counts: torch.Tensor, centers: torch.Tensor, percentile: float) -> tuple[float, float]:
    cdf = torch.cumsum(counts.double(), 0) / counts.sum()
    tail = (100.0 - percentile) / 100.0
    low_bin = int(torch.searchsorted(cdf, torch.tensor(tail, dtype=torch.float64), right=True))
    high_bin = int(torch.searchsorted(cdf, torch.tensor(1.0 - tail, dtype=torch.float64)))
    high_bin = min(high_bin, centers.numel() - 1)
    return min(centers[low_bin].item(), 0.0), max(centers[high_bin].item(), 0.0)


def _quantized_centers(centers: torch.Tensor, lows: torch.Tensor, highs: torch.Tensor) -> torch.Tensor:
    """For each candidate range (rows), the value every bin center decodes to after uint8 quantization."""
    scale = ((highs - lows) / (LEVELS - 1)).double().clamp(min=1e-12)[:, None]
    zero_point = torch.round(-lows.double()[:, None] / scale)
    codes = torch.clamp(torch.round(centers[None, :] / scale) + zero_point, 0, LEVELS - 1)
    return (codes - zero_point) * scale


def _mse_costs(counts: torch.Tensor, centers: torch.Tensor, lows: torch.Tensor, highs: torch.Tensor) -> torch.Tensor:
    decoded = _quantized_centers(centers, lows, highs)
    return ((decoded - centers[None, :]) ** 2 * counts.double()[None, :]).sum(dim=1)


def _kl_costs(counts: torch.Tensor, centers: torch.Tensor, lows: torch.Tensor, highs: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per candidate range, as in TensorRT's entropy calibration: P = the histogram inside the range with
    the clipped mass added to its edge bins; Q = the histogram inside the range (without the clipped mass), spread
    evenly over the non-empty bins of each quantization level. Ranges spanning fewer bins than levels cannot be
    judged (Q would equal P) and are never chosen."""
    decoded = _quantized_centers(centers, lows, highs)
    counts = counts.double()
    return torch.stack([
        _kl_one(counts, decoded[i], (centers >= lows[i]) & (centers <= highs[i])) for i in range(lows.numel())
    ])


def _kl_one(counts: torch.Tensor, decoded: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    if int(inside.sum()) < LEVELS:
        return torch.tensor(float("inf"), dtype=torch.float64)
    kept = torch.where(inside, counts, torch.zeros_like(counts))
    first, last = int(inside.nonzero()[0]), int(inside.nonzero()[-1])
    p = kept.clone()
    p[first] += counts[:first].sum()
    p[last] += counts[last + 1 :].sum()
    _, level = torch.unique(decoded, return_inverse=True)
    occupied = (kept > 0).double()
    level_mass = torch.zeros(int(level.max()) + 1, dtype=torch.float64).index_add_(0, level, kept)
    level_bins = torch.zeros_like(level_mass).index_add_(0, level, occupied)
    q = occupied * level_mass[level] / level_bins[level].clamp(min=1)
    p, q = p / p.sum(), q / q.sum().clamp(min=1e-300)
    mask = p > 0
    return (p[mask] * torch.log(p[mask] / q[mask].clamp(min=1e-12))).sum()
