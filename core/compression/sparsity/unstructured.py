"""Element-wise pruning masks (True = keep): magnitude, N:M, Wanda scores, and the SparseGPT solver."""

from collections.abc import Callable, Iterable, Iterator

import torch

NM = tuple[int, int]


def smallest_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask that prunes exactly round(sparsity × numel) entries with the smallest scores (ties by index)."""
    pruned = round(sparsity * scores.numel())
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if pruned:
        mask[torch.topk(scores.flatten(), pruned, largest=False, sorted=False).indices] = False
    return mask.view(scores.shape)


def rowwise_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask pruning the same number of smallest scores in every output row (Wanda's comparison group)."""
    rows = scores.reshape(scores.shape[0], -1)
    pruned = round(sparsity * rows.shape[1])
    mask = torch.ones_like(rows, dtype=torch.bool)
    if pruned:
        mask.scatter_(1, torch.topk(rows, pruned, dim=1, largest=False, sorted=False).indices, False)
    return mask.view(scores.shape)


def nm_mask(scores: torch.Tensor, nm: NM) -> torch.Tensor:
    """Keep-mask with exactly N kept in every M consecutive inputs of each row (the last dim after flattening)."""
    keep, group = nm
    rows = scores.reshape(scores.shape[0], -1)
    if rows.shape[1] % group:
        raise ValueError(f"{rows.shape[1]} inputs per row is not a multiple of M={group}")
    groups = rows.reshape(-1, group)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(1, torch.topk(groups, keep, dim=1).indices, True)
    return mask.view(scores.shape)


def global_threshold(magnitudes: Callable[[], Iterable[torch.Tensor]], sparsity: float) -> float:
    """The magnitude at rank round(sparsity × total) over all tensors together (values ≤ it are pruned), as
    `torch.kthvalue` of their concatenation gives it, without holding them together: `magnitudes()` yields the
    (non-negative, float32) tensors one at a time and is called twice. An exact radix selection on the float32 bit
    patterns, which order non-negative floats as integers: the first pass counts the upper 16 bits, the second the
    lower 16 bits within the one upper value that holds the rank.

    Example: `global_threshold(lambda: iter([torch.tensor([0.1, 0.3]), torch.tensor([0.2])]), 0.67)` is 0.2 (in
    float32).
    """
    total = 0
    upper = torch.zeros(1 << 16, dtype=torch.int64)
    for magnitude in magnitudes():
        total += magnitude.numel()
        for bits in _bit_chunks(magnitude):
            upper += torch.bincount(bits >> 16, minlength=1 << 16)
    rank = round(sparsity * total)
    if not rank:
        return float("-inf")
    high, before = _bucket_of(upper, rank)
    lower = torch.zeros(1 << 16, dtype=torch.int64)
    for magnitude in magnitudes():
        for bits in _bit_chunks(magnitude):
            lower += torch.bincount(bits[(bits >> 16) == high] & 0xFFFF, minlength=1 << 16)
    low, _ = _bucket_of(lower, rank - before)
    return float(torch.tensor([(high << 16) | low], dtype=torch.int32).view(torch.float32))


def _bit_chunks(magnitude: torch.Tensor, elements: int = 1 << 22) -> Iterator[torch.Tensor]:
    """The tensor's float32 bit patterns as int64, a bounded number at a time."""
    flat = magnitude.detach().float().flatten()
    for start in range(0, flat.numel(), elements):
        yield flat[start:start + elements].view(torch.int32).long()


def _bucket_of(counts: torch.Tensor, rank: int) -> tuple[int, int]:
    """(the bucket holding the `rank`-th smallest value, 1-based; how many values lie in the buckets below it)."""
    cumulative = counts.cumsum(0)
    bucket = int(torch.searchsorted(cumulative, torch.tensor(rank)))
    return bucket, int(cumulative[bucket - 1]) if bucket else 0


def wanda_scores(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ‖X_j‖₂: a weight matters as much as the input it multiplies."""
    return weight.abs() * input_sq_sum.sqrt().to(weight.dtype)[None, :]


@torch.no_grad()
def sparsegpt(weight: torch.Tensor, gram: torch.Tensor, sparsity: float, nm: NM | None, block_size: int,
              dampening: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's column-by-column prune-and-compensate; returns (new weight, keep-mask).

    Within each block of `block_size` columns the mask is chosen by w² / [H⁻¹]_jj² (the error of removing w),
    then each column's pruning error is spread onto the not yet processed columns through the Cholesky factor of
    H⁻¹, so the layer's output on the calibration inputs changes as little as possible.
    """
    w = weight.detach().to(torch.float64).clone()
    hinv = _inverse_hessian_factor(gram.clone(), w, dampening)
    mask = torch.ones_like(w, dtype=torch.bool)
    for start in range(0, w.shape[1], block_size):
        end = min(start + block_size, w.shape[1])
        errors = _prune_block(w, hinv, mask, start, end, sparsity, nm)
        w[:, end:] -= errors @ hinv[start:end, end:]
    return w.to(weight.dtype), mask


def _inverse_hessian_factor(gram: torch.Tensor, w: torch.Tensor, dampening: float) -> torch.Tensor:
    """The upper Cholesky factor of the damped H⁻¹. `gram` (a copy) is consumed and each intermediate let go once
    used: a 5632-wide float64 Gram matrix is 254 MB, so holding all of them would add ~0.5 GB per layer."""
    dead = gram.diagonal() == 0
    gram[dead, dead] = 1  # an input that never fires: its weights are pruned first and cost nothing
    w[:, dead] = 0
    gram.diagonal().add_(dampening * gram.diagonal().mean())
    factor = torch.linalg.cholesky(gram)
    del gram
    inverse = torch.cholesky_inverse(factor)
    del factor
    return torch.linalg.cholesky(inverse, upper=True)


def _prune_block(w: torch.Tensor, hinv: torch.Tensor, mask: torch.Tensor, start: int, end: int, sparsity: float,
                 nm: NM | None) -> torch.Tensor:
    block, h = w[:, start:end].clone(), hinv[start:end, start:end]
    pruned = torch.zeros_like(block, dtype=torch.bool)
    if nm is None:
        pruned = ~smallest_mask(block**2 / h.diagonal()[None, :] ** 2, sparsity)
    errors = torch.zeros_like(block)
    for i in range(end - start):
        if nm is not None and i % nm[1] == 0:
            scores = block[:, i : i + nm[1]] ** 2 / h.diagonal()[i : i + nm[1]][None, :] ** 2
            drop = torch.topk(scores, nm[1] - nm[0], dim=1, largest=False).indices
            pruned[:, i : i + nm[1]].scatter_(1, drop, True)
        column = block[:, i]
        quantized = torch.where(pruned[:, i], torch.zeros_like(column), column)
        errors[:, i] = (column - quantized) / h[i, i]
        block[:, i:] -= errors[:, i : i + 1] @ h[i : i + 1, i:]
        block[:, i] = quantized
    w[:, start:end] = block
    mask[:, start:end] = ~pruned
    return errors
