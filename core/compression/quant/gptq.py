"""GPTQ (Frantar et al., 2022) for one Linear weight: column-by-column rounding onto an integer grid, each column's
error spread over the columns not yet quantized through the Cholesky factor of the inverse input Hessian.

H = sum over calibration tokens of x xᵀ (the layer's inputs). With `act_order`, columns with the largest Hessian
diagonal (the most active inputs) go first while most columns can still absorb their error; group scales are then
fixed up front from the original weight ("static groups"), so the stored format is the same as round-to-nearest's.
Without it, a group's scale is found when its first column is reached, from the error-updated weights.
"""

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from core.compression.quant.grid import (
    GridParams,
    IntGrid,
    dequantize_codes,
    expand_params,
    fp16_scale,
    grid_params,
    searched_grid_params,
)
from core.compression.quant.threads import one_torch_thread

CHOLESKY_RETRIES = 6


@dataclass
class _Columns:
    """One block of columns in processing order, transposed so that each column is a contiguous row."""

    weights: torch.Tensor  # (block columns, rows), updated in place as errors are spread
    scale: torch.Tensor  # (block columns, rows or 1)
    zero: torch.Tensor  # (block columns, rows or 1), float codes of 0.0
    importance: torch.Tensor | None = None  # (block columns,) Hessian diagonal, when group ranges are searched


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: IntGrid,
    dampening: float = 0.01,
    block_columns: int = 128,
    act_order: bool = False,
    clip_search: bool = False,
    refit_rounds: int = 0,
) -> tuple[torch.Tensor, GridParams]:
    """Unsigned codes (rows x columns, uint8) and grid params for `weight`, minimising ‖(W - Q) X‖² rather than
    ‖W - Q‖². Each of `refit_rounds` re-solves the scales for the codes chosen (`refitted_scales`); a round after
    the first runs GPTQ again on the refitted scales first, so the codes can follow them.
    Example: `codes, params = gptq_quantize(linear.weight, hessian, IntGrid(4, True, "per_group", 128))`.
    """
    args = (grid, dampening, block_columns, act_order, clip_search)
    with torch.no_grad(), one_torch_thread():  # thousands of tiny ops per layer
        codes, params = _gptq(weight, hessian, *args)
    if grid.granularity == "per_tensor" or not refit_rounds:
        return codes, params  # per tensor: one scale for the whole tensor, nothing for a per-row refit to move
    best = (codes, params, output_error(weight, dequantize_codes(codes, params, grid), hessian))
    for round_ in range(refit_rounds):
        with torch.no_grad():
            if round_:
                with one_torch_thread():
                    codes, params = _gptq(weight, hessian, *args, fixed=params)
            params = refitted_scales(weight, hessian, codes, params, grid, dampening)
            error = output_error(weight, dequantize_codes(codes, params, grid), hessian)
        if error < best[2]:  # a round is not always an improvement (without act_order, say): keep the best
            best = (codes, params, error)
    return best[0], best[1]


def output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """GPTQ's objective ‖(W - Q)X‖² = tr((W - Q) H (W - Q)ᵀ), H = X Xᵀ summed over the calibration tokens."""
    delta = weight.detach().float() - quantized
    return float(((delta @ hessian.float()) * delta).sum())


def _gptq(
    weight: torch.Tensor, hessian: torch.Tensor, grid: IntGrid, dampening: float, block_columns: int, act_order: bool,
    clip_search: bool, fixed: GridParams | None = None,
) -> tuple[torch.Tensor, GridParams]:
    w, diag = weight.detach().float().clone(), torch.diag(hessian.detach()).double()
    dead = diag == 0  # inputs that were always zero: their weights cannot matter, so they go to 0
    diag[dead] = 1
    w[:, dead] = 0
    # Static scales (or the `fixed` ones given); without act_order each group's are replaced when reached.
    if fixed is not None:
        params = GridParams(fixed.scale.clone(), None if fixed.zero_point is None else fixed.zero_point.clone())
    else:
        params = searched_grid_params(w, grid, diag) if clip_search else grid_params(w, grid)
    order = torch.argsort(diag, descending=True) if act_order else torch.arange(w.shape[1], device=w.device)
    w, hinv = w[:, order], _inverse_cholesky(_float64_hessian(hessian, dead, order if act_order else None), dampening)
    dynamic = grid.granularity == "per_group" and not act_order and fixed is None
    codes = torch.zeros(w.shape[1], w.shape[0], dtype=torch.uint8, device=w.device)
    step = _block_width(grid, block_columns) if dynamic else block_columns
    importance = diag[order].float() if clip_search and dynamic else None
    for start in range(0, w.shape[1], step):
        end = min(start + step, w.shape[1])
        block = _Columns(w[:, start:end].T.contiguous(), *_block_params(params, grid, order[start:end]),
                         None if importance is None else importance[start:end])
        errors = _quantize_block(block, hinv[start:end, start:end], codes[start:end], params, grid, start, dynamic)
        w[:, end:] -= errors.T @ hinv[start:end, end:]  # lazy batch update of the columns after the block
    return codes.T[:, torch.argsort(order)].contiguous(), params


def refitted_scales(
    weight: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor, params: GridParams, grid: IntGrid,
    dampening: float, chunk_elements: int = 1 << 24,
) -> GridParams:
    """The scales that minimise ‖(W - Q) X‖² for the codes GPTQ chose, zero points kept.

    GPTQ picks codes against scales fixed before it (the clip search's), so once the codes are known each row's
    decoded weight Σ_g s_g (q_g - z_g) is linear in its scales: they solve a G x G least-squares system in the
    (damped) input Hessian, G the row's groups. The codes and the stored format do not change. A refitted scale
    that is not finite, changes sign or moves by more than 2x is not trusted and the old one is kept.
    """
    w, h = weight.detach().float(), hessian.detach().float()
    damp = dampening * float(torch.diag(h).mean())
    width = grid.group_columns(w.shape[1])
    pad = -w.shape[1] % width
    # H padded to whole groups (zero rows and columns for the padding), then (columns, groups, group columns)
    h_groups = F.pad(h, (0, pad, 0, pad)).view(w.shape[1] + pad, -1, width)
    groups = h_groups.shape[1]
    rows_per_chunk = max(1, chunk_elements // ((w.shape[1] + pad) * groups))
    old = params.scale.float()
    fresh = old.clone()
    for start in range(0, w.shape[0], rows_per_chunk):
        rows = slice(start, min(start + rows_per_chunk, w.shape[0]))
        fresh[rows] = _solve_rows(w[rows], codes[rows], params, grid, rows, h, h_groups, damp, pad)
    trusted = torch.isfinite(fresh) & (fresh * old > 0) & ((fresh / old - 1.25).abs() <= 0.75)
    return GridParams(fp16_scale(torch.where(trusted, fresh, old)), params.zero_point)


def _solve_rows(
    w: torch.Tensor, codes: torch.Tensor, params: GridParams, grid: IntGrid, rows: slice, h: torch.Tensor,
    h_groups: torch.Tensor, damp: float, pad: int,
) -> torch.Tensor:
    """Least-squares scales for a chunk of rows: M s = v with M[g, g'] = b_gᵀ H b_g' and v[g] = b_gᵀ H w, b_g the
    row's codes minus zero point on group g's columns (zeros elsewhere)."""
    sub = GridParams(params.scale[rows], None if params.zero_point is None else params.zero_point[rows])
    _, zero = expand_params(sub, grid, w.shape[1])
    b = F.pad(codes.float() - zero, (0, pad)).view(w.shape[0], h_groups.shape[1], -1)  # (rows, groups, width)
    hb = torch.einsum("igk,rgk->rig", h_groups, b)  # (rows, columns + pad, groups): H b_g for each group
    m = torch.einsum("rgk,rgkh->rgh", b, hb.view(*b.shape, -1))
    m.diagonal(dim1=1, dim2=2).add_(damp * b.square().sum(dim=2))
    v = (F.pad(w @ h + damp * w, (0, pad)).view_as(b) * b).sum(dim=2)
    ridge = 1e-9 * m.diagonal(dim1=1, dim2=2).mean(dim=1).clamp(min=1e-30)
    m.diagonal(dim1=1, dim2=2).add_(ridge[:, None])
    return torch.linalg.solve(m.double(), v.double()).float()


def _quantize_block(
    block: _Columns, hinv: torch.Tensor, codes: torch.Tensor, params: GridParams, grid: IntGrid, start: int,
    dynamic: bool,
) -> torch.Tensor:
    """Quantize the block's columns in order, writing `codes`; returns the errors scaled by 1 / hinv[i, i]."""
    low, high = (0, grid.levels) if params.zero_point is not None else grid.code_bounds
    width = grid.group_size or hinv.shape[0]
    errors = torch.zeros_like(block.weights)
    for j in range(block.weights.shape[0]):
        if dynamic and (start + j) % width == 0:
            _refresh_group(block, j, width, params, grid, (start + j) // width)
        column, scale, zero = block.weights[j], block.scale[j], block.zero[j]
        code = torch.clamp(torch.round(column / scale) + zero, low, high)
        errors[j] = (column - (code - zero) * scale) / hinv[j, j]
        block.weights[j:].addr_(hinv[j, j:], errors[j], alpha=-1)
        codes[j] = code.to(torch.uint8)
    return errors


def _block_params(params: GridParams, grid: IntGrid, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero code of each of the block's (original) columns, one row per column."""
    groups = columns // grid.group_size if grid.group_size else torch.zeros_like(columns)
    scale = params.scale.float()[:, groups].T.contiguous()
    if params.zero_point is None:
        return scale, torch.full_like(scale, grid.offset)
    return scale, params.zero_point.float()[:, groups].T.contiguous()


def _refresh_group(block: _Columns, j: int, width: int, params: GridParams, grid: IntGrid, group: int) -> None:
    """Scales of the group starting at block column j, from its current (error-updated) weights."""
    columns, row_grid = block.weights[j : j + width].T, replace(grid, granularity="per_channel", group_size=None)
    if block.importance is None:
        fresh = grid_params(columns, row_grid)
    else:
        fresh = searched_grid_params(columns, row_grid, block.importance[j : j + width])
    params.scale[:, group] = fresh.scale[:, 0]
    block.scale[j : j + width] = fresh.scale[:, 0].float()
    if params.zero_point is not None and fresh.zero_point is not None:
        params.zero_point[:, group] = fresh.zero_point[:, 0]
        block.zero[j : j + width] = fresh.zero_point[:, 0].float()


def _block_width(grid: IntGrid, block_columns: int) -> int:
    """Blocks made of whole groups, so a group's scale is found from columns already updated by the errors."""
    group = grid.group_size or block_columns
    return max(block_columns // group, 1) * group


def _float64_hessian(hessian: torch.Tensor, dead: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """The Hessian in float64 (one copy), dead inputs' diagonal set to 1, rows and columns in `order` if given."""
    h = hessian.detach().to(torch.float64, copy=True)
    h[dead, dead] = 1
    return h if order is None else h[order[:, None], order]


def _inverse_cholesky(h: torch.Tensor, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹, in float64 for stability; λ grows until H is definite.

    `h` is consumed (damped in place, and let go as soon as it is factored): at float64, the 11008-wide Hessian of a
    7B model's down_proj is 1 GB, so each copy not made here is a GB of peak memory."""
    undamped = torch.diag(h)
    mean_diag = undamped.mean()
    for attempt in range(CHOLESKY_RETRIES):
        h.diagonal().copy_(undamped + dampening * 10**attempt * mean_diag)
        factor, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            del h
            inverse = torch.cholesky_inverse(factor)
            del factor
            return torch.linalg.cholesky(inverse, upper=True).float()
    raise ValueError("the calibration Hessian is not positive definite even with heavy dampening")
