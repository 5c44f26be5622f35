"""k-means weight sharing: 2**bits centroids per row or per tensor, stored as packed indices + codebook."""

from torch import nn

from core.compression.configs.quantize import QuantizeKMeans
from core.compression.quant.kmeans import quantize_kmeans
from core.compression.quant.weights import quantize_selected
from core.compression.registry import register_step
from core.compression.sparsity.masks import mask_of
from core.compression.state import Encoding, ModelState, StepContext, StepReport


@register_step(QuantizeKMeans)
def quantize_kmeans_step(state: ModelState, config: QuantizeKMeans, ctx: StepContext) -> StepReport:
    """Replace each selected Linear (and Embedding) weight by its nearest codebook values, in place.

    The codebook of each row (or tensor) holds 2**bits float16 centroids; the artifact stores bit-packed indices
    into it, and the in-memory weight is overwritten with the decoded values. After a prune step the centroids fit
    the kept weights only and pruned positions store no index (Deep Compression's order: prune, then share).

    Example recipe step: `{"type": "quantize", "method": "kmeans", "bits": 4, "granularity": "per_channel"}`.
    """
    codebooks = {"per_channel": "per row", "per_column": "per column"}.get(config.granularity, "per tensor")
    # A pruned weight's centroids fit its kept values only, and only their indices are stored. The mask is read
    # when its weight is encoded: with the blocks offloaded, only then is it in memory.
    names = {id(state.model.get_parameter(name)): name for name in state.encodings}

    def encode(weight: nn.Parameter) -> Encoding:
        name = names.get(id(weight))
        mask = mask_of(state, name) if name is not None else None
        return quantize_kmeans(weight, config.bits, config.granularity, config.iterations, mask)

    describe = f"share {2**config.bits} float16 centroids {codebooks}; indices bit-packed"
    return quantize_selected(state, config, ctx, encode, config.bits, describe)
