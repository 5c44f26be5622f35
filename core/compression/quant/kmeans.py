"""Weight sharing with k-means codebooks (Deep Compression's trained quantization, without the retraining).

Each row (or the whole tensor) gets 2**bits centroids from 1-D Lloyd iterations seeded at evenly spaced quantiles;
a weight is stored as the index of its nearest centroid, bit-packed, next to a float16 codebook. In one dimension
the nearest centroid is found by bisection between sorted centroids' midpoints, never a rows x values x k table.
"""

from typing import Literal

import torch

from core.compression.encoding import register_decoder
from core.compression.quant.packing import pack_bits, unpack_bits
from core.compression.state import Encoding

KMEANS = "kmeans"
# One codebook per output row (`per_channel`), per input column (`per_column`: for an embedding table, per hidden
# dimension, each with its own range), or for the whole tensor.
Granularity = Literal["per_tensor", "per_channel", "per_column"]
ROWS_PER_CHUNK_VALUES = 1 << 22  # values per chunk of rows: bounds the temporary tensors to a few tens of MB


@torch.no_grad()
def quantize_kmeans(
    weight: torch.Tensor, bits: int, granularity: Granularity, iterations: int,
    mask: torch.Tensor | None = None,
) -> Encoding:
    """The `kmeans` encoding of a 2-D weight: 2**bits centroids per row (`per_channel`), per column
    (`per_column`) or per tensor.

    mask: the kept positions of a pruned weight; the centroids then fit the kept values only (as in Deep
    Compression), and wrapping the result with `sparse_encoding` stores the indices of kept positions only.

    Example: `decode(quantize_kmeans(linear.weight, 4, "per_channel", 20))` uses at most 16 values per row.
    """
    if weight.ndim != 2:
        raise ValueError(f"kmeans needs a 2-D weight, got shape {tuple(weight.shape)}")
    rows, columns = weight.shape
    values = grouped(weight.detach().float(), granularity)
    kept = torch.ones_like(values, dtype=torch.bool) if mask is None else grouped(mask.to(values.device), granularity)
    chunk = max(1, ROWS_PER_CHUNK_VALUES // values.shape[1])
    parts = [_codebook_and_indices(part, keep, 2**bits, iterations)
             for part, keep in zip(values.split(chunk), kept.split(chunk), strict=True)]
    codebook = torch.cat([book for book, _ in parts])
    # Indices are stored in the weight's own order whatever the grouping, so sparse storage can compact them.
    indices = ungrouped(torch.cat([index for _, index in parts]), [rows, columns], granularity)
    meta = {"bits": bits, "shape": [rows, columns], "granularity": granularity, "packed": ["indices"]}
    return Encoding(KMEANS, {"indices": pack_bits(indices, bits), "codebook": codebook}, meta)


def grouped(tensor: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """A (rows x columns) tensor as (codebooks x values sharing one): one row per codebook."""
    if granularity == "per_column":
        return tensor.t().contiguous()
    return tensor.reshape(tensor.shape[0] if granularity == "per_channel" else 1, -1)


def ungrouped(tensor: torch.Tensor, shape: list[int], granularity: Granularity) -> torch.Tensor:
    """The inverse of `grouped`: back to the weight's (rows x columns) layout."""
    if granularity == "per_column":
        return tensor.t().contiguous()
    return tensor.reshape(shape)


@register_decoder(KMEANS)
def _decode_kmeans(encoding: Encoding) -> torch.Tensor:
    shape, granularity = encoding.meta["shape"], encoding.meta["granularity"]
    codebook = encoding.tensors["codebook"].float()
    indices = unpack_bits(encoding.tensors["indices"], encoding.meta["bits"], shape[0] * shape[1]).long()
    return ungrouped(codebook.gather(1, grouped(indices.view(shape), granularity)), shape, granularity)


def _codebook_and_indices(values: torch.Tensor, kept: torch.Tensor, k: int,
                          iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd iterations on the `kept` entries of each row of `values`; returns (float16 codebook (rows, k), uint8
    indices of every entry)."""
    centroids = _quantile_seeds(values, kept, k)
    weights = kept.float()
    for _ in range(iterations):
        updated = _centroid_means(values, weights, nearest(values, centroids), centroids)
        if torch.equal(updated, centroids):
            break
        centroids = updated
    # The artifact stores float16 centroids: assign against those, so each weight gets its truly nearest value.
    codebook = centroids.half().sort(dim=1).values
    return codebook, nearest(values, codebook.float()).to(torch.uint8)


def nearest(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted `centroids` (rows, k) for every entry of `values` (rows, n)."""
    midpoints = ((centroids[:, 1:] + centroids[:, :-1]) / 2).contiguous()
    return torch.searchsorted(midpoints, values.contiguous())


def _quantile_seeds(values: torch.Tensor, kept: torch.Tensor, k: int) -> torch.Tensor:
    """Evenly spaced quantiles of each row's kept values (the unkept sort last, past every position used)."""
    ordered = values.masked_fill(~kept, float("inf")).sort(dim=1).values
    last = (kept.sum(dim=1, keepdim=True) - 1).clamp(min=0)
    positions = ((torch.arange(k) + 0.5) / k * last).round().long()
    seeds = ordered.gather(1, positions)
    return torch.where(seeds.isfinite(), seeds, torch.zeros((), dtype=seeds.dtype))  # a row with nothing kept


def _centroid_means(values: torch.Tensor, weights: torch.Tensor, assignment: torch.Tensor,
                    centroids: torch.Tensor) -> torch.Tensor:
    """Each centroid moves to the mean of its (kept) values; one that lost all its values stays where it was."""
    sums = torch.zeros_like(centroids).scatter_add_(1, assignment, values * weights)
    counts = torch.zeros_like(centroids).scatter_add_(1, assignment, weights)
    means = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return means.sort(dim=1).values
