"""Low-rank factorization: W ≈ B·A as two smaller layers, plain, activation-scaled (ASVD) or whitened (SVD-LLM).

A Linear (out × in) becomes Linear(in → r, no bias) then Linear(r → out, with W's bias). A Conv2d (groups 1) becomes a
kh×1 conv into r channels then a 1×kw conv (spatial SVD, Jaderberg et al. 2014): the SVD of W rearranged as an
(in·kh) × (out·kw) matrix, so the pair computes exactly the rank-r part of the original kernel.
"""

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.compression.configs.decompose import DecomposeASVD, DecomposeSVD, DecomposeSVDLLM
from core.compression.rewrites import register_rewrite, set_submodule

FACTOR_LINEAR, FACTOR_CONV2D = "factor_linear", "factor_conv2d"
DecomposeConfig = DecomposeSVD | DecomposeASVD | DecomposeSVDLLM


@dataclass
class Factors:
    """first: r × in (applied first), second: out × r; `singular` are all singular values of the factored matrix."""

    first: torch.Tensor
    second: torch.Tensor
    singular: torch.Tensor


def choose_rank(singular: torch.Tensor, per_rank: int, original: int, config: DecomposeConfig) -> int:
    """The rank the config asks for (see DecomposeSVD); may be too large to save anything (the caller checks)."""
    full = singular.numel()
    if config.rank is not None:
        return min(config.rank, full)
    if config.rank_ratio is not None:
        return max(1, min(full, round(config.rank_ratio * full)))
    if config.energy is not None:
        energy = torch.cumsum(singular.double() ** 2, 0) / (singular.double() ** 2).sum().clamp(min=1e-300)
        return min(full, int((energy < config.energy - 1e-12).sum()) + 1)
    return min(full, math.floor(config.params_kept * original / per_rank))


def svd_factors(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    return u, s, vh


def truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(second, first) = (U_r √Σ_r, √Σ_r V_r^T): the singular values split evenly between the two factors."""
    root = s[:rank].sqrt()
    return u[:, :rank] * root[None, :], root[:, None] * vh[:rank]


def plain(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """SVD of W itself; the fourth value maps the first factor back (identity here)."""
    return (*svd_factors(weight), None)


def activation_scaled(weight: torch.Tensor, abs_mean: torch.Tensor, alpha: float) -> tuple[Any, ...]:
    """ASVD: SVD of W·diag(s) with s = mean|x|^alpha; the first factor is divided by s afterwards."""
    scale = abs_mean.to(torch.float64).clamp(min=1e-6) ** alpha
    return (*svd_factors(weight.to(torch.float64) * scale[None, :]), ("scale", scale))


def whitened(weight: torch.Tensor, gram: torch.Tensor, dampening: float) -> tuple[Any, ...]:
    """SVD-LLM: SVD of W·L with X^T X = L L^T (Cholesky); the first factor is multiplied by L^-1 afterwards."""
    lower = _cholesky(gram.to(torch.float64), dampening)
    return (*svd_factors(weight.to(torch.float64) @ lower), ("whiten", lower))


def _cholesky(gram: torch.Tensor, dampening: float) -> torch.Tensor:
    # More damping until X^T X + λI is positive definite (inputs that never fire make it singular).
    mean_diag = gram.diagonal().mean().clamp(min=1e-12)
    for attempt in range(8):
        damping = torch.eye(len(gram), dtype=gram.dtype, device=gram.device) * dampening * 10**attempt * mean_diag
        lower, info = torch.linalg.cholesky_ex(gram + damping)
        if int(info) == 0:
            return lower
    raise ValueError("the input Gram matrix is not positive definite even after damping")


def finish(first: torch.Tensor, transform: Any) -> torch.Tensor:
    """Undo the activation transform on the first factor (r × in)."""
    if transform is None:
        return first
    kind, value = transform
    if kind == "scale":
        return first / value[None, :]
    return torch.linalg.solve_triangular(value, first, upper=False, left=False)  # first · L^-1


def conv_matrix(weight: torch.Tensor) -> torch.Tensor:
    """W[o, c, i, j] as the (c·kh + i) × (o·kw + j) matrix whose rank-r part is a kh×1 conv then a 1×kw conv."""
    out_channels, in_channels, kh, kw = weight.shape
    return weight.permute(1, 2, 0, 3).reshape(in_channels * kh, out_channels * kw)


def conv_kernels(second: torch.Tensor, first: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """(vertical r × in × kh × 1, horizontal out × r × 1 × kw) kernels from the factors of `conv_matrix`."""
    out_channels, in_channels, kh, kw = shape
    rank = first.shape[0]
    vertical = second.T.reshape(rank, in_channels, kh, 1)
    horizontal = first.reshape(rank, out_channels, kw).permute(1, 0, 2).reshape(out_channels, rank, 1, kw)
    return vertical, horizontal


@register_rewrite(FACTOR_LINEAR)
def _factor_linear(model: nn.Module, name: str, meta: dict[str, Any]) -> None:
    """Replace Linear `name` by Sequential(Linear(in, rank, bias=False), Linear(rank, out)) (weights uninitialised)."""
    linear = model.get_submodule(name)
    options = {"device": linear.weight.device, "dtype": linear.weight.dtype}
    pair = nn.Sequential(nn.Linear(linear.in_features, meta["rank"], bias=False, **options),
                         nn.Linear(meta["rank"], linear.out_features, bias=linear.bias is not None, **options))
    set_submodule(model, name, pair)


@register_rewrite(FACTOR_CONV2D)
def _factor_conv2d(model: nn.Module, name: str, meta: dict[str, Any]) -> None:
    """Replace Conv2d `name` by a kh×1 conv into `rank` channels followed by a 1×kw conv (strides split per axis)."""
    conv = model.get_submodule(name)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    options = {"device": conv.weight.device, "dtype": conv.weight.dtype}
    rank = meta["rank"]
    pair = nn.Sequential(
        nn.Conv2d(conv.in_channels, rank, (kh, 1), (sh, 1), (ph, 0), (dh, 1), bias=False, **options),
        nn.Conv2d(rank, conv.out_channels, (1, kw), (1, sw), (0, pw), (1, dw), bias=conv.bias is not None, **options),
    )
    set_submodule(model, name, pair)


def factorable_conv(conv: nn.Conv2d) -> bool:
    """Spatial SVD needs an ordinary convolution: one group, numeric zero padding."""
    return conv.groups == 1 and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
