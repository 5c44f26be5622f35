"""Integer grids for weight quantization: scales (and zero points) per tensor, row or group of columns.

A 2-D weight (out_features x in_features, or vocab x dim for an embedding) is quantized along its rows; a group is
`group_size` consecutive columns of one row. Codes are unsigned, in [0, 2**bits):

    symmetric:  w ~ (code - 2**(bits-1)) * scale, codes 2**(bits-1) +- (2**(bits-1) - 1), scale = max|w| / qmax
    full range: symmetric with all 2**bits codes: scale = -m / 2**(bits-1), m the group's weight of largest
                magnitude with its sign, which lands exactly on code 0 (llama.cpp's Q4_0/Q8_0 rounding; scales
                may be negative). Decoding is the same formula, so the artifact format does not change.
    asymmetric: w ~ (code - zero_point) * scale, integer zero_point, scale = (max - min) / (2**bits - 1)

Scales are float16 (half the overhead of float32; GPTQ and compressed-tensors do the same) and codes are rounded
against the float16 scale actually stored, so round-to-nearest holds for what the artifact computes.
"""

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Granularity = Literal["per_tensor", "per_channel", "per_group"]
FP16_MAX, FP16_TINY = 65504.0, 2.0**-24


@dataclass(frozen=True)
class IntGrid:
    """How a weight is quantized: code width, symmetry, and how many columns share one scale."""

    bits: int
    symmetric: bool = True
    granularity: Granularity = "per_channel"
    group_size: int | None = None
    full_range: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {self.bits}")
        if self.full_range and not self.symmetric:
            raise ValueError("full_range applies to symmetric grids only")
        if (self.granularity == "per_group") != (self.group_size is not None):
            raise ValueError(f"granularity {self.granularity!r} and group_size {self.group_size} do not match")

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    @property
    def offset(self) -> int:
        """The code of 0.0 on a symmetric grid."""
        return 2 ** (self.bits - 1)

    @property
    def code_bounds(self) -> tuple[int, int]:
        """The lowest and highest unsigned code a symmetric grid uses."""
        return (0 if self.full_range else 1), self.levels

    def group_columns(self, columns: int) -> int:
        """Columns that share one scale: a group, or the whole row."""
        return self.group_size if self.group_size is not None else columns


@dataclass
class GridParams:
    """Scales of shape (rows or 1, groups), float16, and integer zero points (uint8) when asymmetric."""

    scale: torch.Tensor
    zero_point: torch.Tensor | None


def grid_params(weight: torch.Tensor, grid: IntGrid) -> GridParams:
    """Per-tensor, per-row or per-group scales (and zero points) for a 2-D float weight."""
    groups = _grouped(weight.float(), grid)
    dims = (0, 2) if grid.granularity == "per_tensor" else (2,)
    low = groups.amin(dim=dims).clamp(max=0)
    high = groups.amax(dim=dims).clamp(min=0)
    if grid.granularity == "per_tensor":
        low, high = low.view(1, 1), high.view(1, 1)
    return params_from_range(low, high, grid)


def searched_grid_params(
    weight: torch.Tensor, grid: IntGrid, importance: torch.Tensor | None = None, steps: int = 20, floor: float = 0.6
) -> GridParams:
    """Like `grid_params`, but each row's or group's range is shrunk by the factor in [floor, 1] that minimises its
    rounding error Σ importance_j (w_j - q(w_j))², a clipping search as in GPTQ's `mse` option and llama.cpp: a
    few outliers no longer stretch the step of every other weight. `importance` is one weight per column (e.g. the
    diagonal of the input Hessian); None weighs all columns alike. Per-tensor grids keep the plain range.
    """
    if grid.granularity == "per_tensor":
        return grid_params(weight, grid)
    w = weight.float()
    column_weight = 1.0 if importance is None else importance.float().clamp(min=0)
    groups = _grouped(w, grid)
    low, high = groups.amin(dim=2).clamp(max=0), groups.amax(dim=2).clamp(min=0)
    best, best_error = None, None
    for shrink in torch.linspace(1.0, floor, steps).tolist():
        params = params_from_range(low * shrink, high * shrink, grid)
        decoded = dequantize_codes(quantize_codes(w, params, grid), params, grid)
        error = _grouped((decoded - w).square_().mul_(column_weight), grid).sum(dim=2)
        if best is None or best_error is None:
            best, best_error = params, error
            continue
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best.scale = torch.where(better, params.scale, best.scale)
        if best.zero_point is not None and params.zero_point is not None:
            best.zero_point = torch.where(better, params.zero_point, best.zero_point)
    return best


def params_from_range(low: torch.Tensor, high: torch.Tensor, grid: IntGrid) -> GridParams:
    """Scales and zero points for value ranges [low, high] that contain 0 (padding columns are zeros)."""
    if grid.symmetric and grid.full_range:
        extreme = torch.where(high >= -low, high, low)
        return GridParams(fp16_scale(-extreme / grid.offset), None)
    if grid.symmetric:
        return GridParams(fp16_scale(high.maximum(-low) / (grid.offset - 1)), None)
    scale = fp16_scale((high - low) / grid.levels)
    zero_point = torch.clamp(torch.round(-low / scale.float()), 0, grid.levels)
    return GridParams(scale, zero_point.to(torch.uint8))


def quantize_codes(weight: torch.Tensor, params: GridParams, grid: IntGrid) -> torch.Tensor:
    """Unsigned codes (uint8, same shape as `weight`) rounded to nearest on the grid of `params`."""
    scale, zero = expand_params(params, grid, weight.shape[1])
    if grid.symmetric:
        low, high = grid.code_bounds
        return torch.clamp(torch.round(weight.float() / scale) + grid.offset, low, high).to(torch.uint8)
    return torch.clamp(torch.round(weight.float() / scale) + zero, 0, grid.levels).to(torch.uint8)


def dequantize_codes(codes: torch.Tensor, params: GridParams, grid: IntGrid) -> torch.Tensor:
    """The float32 weight that unsigned `codes` stand for."""
    scale, zero = expand_params(params, grid, codes.shape[1])
    return (codes.float() - zero) * scale


def expand_params(params: GridParams, grid: IntGrid, columns: int) -> tuple[torch.Tensor, torch.Tensor | float]:
    """Scale and zero point repeated to one value per column (broadcastable against the weight)."""
    width = grid.group_columns(columns)
    scale = params.scale.float().repeat_interleave(width, dim=1)[:, :columns]
    if params.zero_point is None:
        return scale, float(grid.offset)
    return scale, params.zero_point.float().repeat_interleave(width, dim=1)[:, :columns]


def _grouped(weight: torch.Tensor, grid: IntGrid) -> torch.Tensor:
    """(rows, groups, group columns) view; a ragged last group is padded with zeros, which never widen a range
    that always includes 0."""
    width = grid.group_columns(weight.shape[1])
    padded = F.pad(weight, (0, -weight.shape[1] % width))
    return padded.view(weight.shape[0], -1, width)


def fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """`scale` as the float16 the artifact stores, sign kept, magnitude clamped to float16's range."""
    # An all-zero group has no range: scale 1 encodes it as the zero code instead of 0 / 0 = NaN. A full-range
    # grid's scale keeps its sign.
    magnitude = torch.where(scale != 0, scale.abs(), torch.ones_like(scale)).clamp(FP16_TINY, FP16_MAX)
    return torch.where(scale < 0, -magnitude, magnitude).to(torch.float16)
