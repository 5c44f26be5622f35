"""k-means weight sharing: 2**bits centroids per row or per tensor, stored as packed indices + codebook."""

from core.compression.configs.quantize import QuantizeKMeans
from core.compression.quant.kmeans import quantize_kmeans
from core.compression.quant.modules import (
    SharedWeight,
    encode_each,
    select_modules,
    shared_weights,
    size_metrics,
    tied_notes,
)
from core.compression.registry import register_step
from core.compression.state import Encoding, ModelState, StepContext, StepReport


@register_step(QuantizeKMeans)
def quantize_kmeans_step(state: ModelState, config: QuantizeKMeans, ctx: StepContext) -> StepReport:
    """Replace each selected Linear (and Embedding) weight by its nearest codebook values, in place.

    The codebook of each row (or tensor) holds 2**bits float16 centroids; the artifact stores bit-packed indices
    into it, and the in-memory weight is overwritten with the decoded values.

    Example recipe step: `{"type": "quantize", "method": "kmeans", "bits": 4, "granularity": "per_channel"}`.
    """
    selected = select_modules(state.model, config.targets, config.exclude, config.include_embeddings)
    weights = shared_weights(state.model, selected)

    def encode(shared: SharedWeight) -> Encoding:
        return quantize_kmeans(shared.weight, config.bits, config.granularity, config.iterations)

    encode_each(state, weights, encode, ctx)
    codebooks = "per row" if config.granularity == "per_channel" else "per tensor"
    notes = [f"{len(weights)} weights share {2**config.bits} float16 centroids {codebooks}; indices bit-packed"]
    metrics = size_metrics(state, weights)
    metrics["bits"] = config.bits
    return StepReport(metrics=metrics, notes=notes + tied_notes(weights))
