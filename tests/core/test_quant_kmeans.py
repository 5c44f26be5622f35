"""k-means weight sharing: decoded weights stay on their codebook, clustered data is recovered exactly, a pruned
weight clusters and stores its kept values only."""

import pytest
import torch

from core.compression.encoding import decode, quantize_rtn
from core.compression.pipeline import run_pipeline
from core.compression.quant.kmeans import quantize_kmeans
from core.compression.quant.packing import packed_size
from core.compression.sparsity.masks import SPARSE_BITMASK, sparse_encoding, unwrap
from core.compression.spec import JobSpec
from core.compression.state import ModelState, StepContext
from tests.core.quant_helpers import cosine_vs_fp32, quantize_with
from tests.models import tiny_bert, tiny_llama


def test_four_exact_clusters_are_recovered() -> None:
    weight = torch.tensor([[-1.0, -1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 0.0]])
    encoding = quantize_kmeans(weight, bits=2, granularity="per_channel", iterations=10)
    assert encoding.tensors["codebook"].tolist() == [[-1.0, 0.0, 0.5, 2.0]]
    assert encoding.tensors["indices"].numel() == 2  # 8 two-bit indices
    assert torch.equal(decode(encoding), weight)


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_decoded_weights_stay_on_their_codebook(granularity: str) -> None:
    weight = torch.randn(12, 50, generator=torch.Generator().manual_seed(0))
    encoding = quantize_kmeans(weight, bits=3, granularity=granularity, iterations=20)
    codebook = encoding.tensors["codebook"].float()
    assert encoding.tensors["codebook"].dtype == torch.float16
    assert codebook.shape == ((12, 8) if granularity == "per_channel" else (1, 8))
    decoded = decode(encoding)
    for row in range(12):
        book = codebook[row if granularity == "per_channel" else 0]
        assert torch.isin(decoded[row], book).all()
        nearest = book[(weight[row, :, None] - book).abs().argmin(dim=1)]
        assert torch.equal(decoded[row], nearest)  # every weight maps to its nearest centroid


def test_per_column_codebooks_follow_each_column() -> None:
    # Columns of very different ranges (an embedding table's hidden dimensions): each gets its own 4 values.
    scales = torch.tensor([1e-3, 1e-2, 0.1, 1, 10, 100])
    weight = torch.randn(40, 6, generator=torch.Generator().manual_seed(4)) * scales
    encoding = quantize_kmeans(weight, bits=2, granularity="per_column", iterations=20)
    codebook = encoding.tensors["codebook"].float()
    assert codebook.shape == (6, 4)
    decoded = decode(encoding)
    for column in range(6):
        book = codebook[column]
        assert torch.equal(decoded[:, column], book[(weight[:, column, None] - book).abs().argmin(dim=1)])
    per_tensor = decode(quantize_kmeans(weight, bits=2, granularity="per_tensor", iterations=20))
    small = slice(0, 3)  # a shared codebook spends its values on the wide columns
    assert (decoded - weight)[:, small].norm() < 0.25 * (per_tensor - weight)[:, small].norm()


def test_pruned_per_column_weight_round_trips_through_sparse_storage() -> None:
    weight = torch.randn(30, 8, generator=torch.Generator().manual_seed(5))
    mask = weight.abs() > weight.abs().median()
    pruned = weight * mask
    inner = quantize_kmeans(pruned, 4, "per_column", 20, mask=mask)
    encoding = sparse_encoding(mask, inner)
    assert torch.equal(decode(encoding), decode(inner) * mask)
    assert torch.equal(decode(encoding) == 0, ~mask)


def test_kmeans_per_row_beats_rtn_at_the_same_bits() -> None:
    weight = torch.randn(16, 256, generator=torch.Generator().manual_seed(1)) ** 3  # heavy tails
    kmeans_error = (decode(quantize_kmeans(weight, 4, "per_channel", 20)) - weight).norm()
    rtn_error = (decode(quantize_rtn(weight, bits=4, granularity="per_channel")) - weight).norm()
    assert kmeans_error < 0.9 * rtn_error


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama])
def test_kmeans_step_on_tiny_models(build) -> None:
    state, report = quantize_with(build(), method="kmeans", bits=4)
    assert cosine_vs_fp32(build(), state.model) >= 0.98
    assert all(encoding.format == "kmeans" for encoding in state.encodings.values())
    assert report.metrics["bits"] == 4


def test_pruned_weight_clusters_and_stores_its_kept_values_only() -> None:
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    mask = weight.abs() > weight.abs().median()  # half the weights pruned
    pruned = weight * mask
    encoding = sparse_encoding(mask, quantize_kmeans(pruned, 4, "per_channel", 20, mask=mask))
    decoded = decode(encoding)
    assert torch.equal(decoded == 0, ~mask)  # pruned exactly zero, kept values on a nonzero centroid
    assert encoding.tensors["inner.indices"].numel() == packed_size(int(mask.sum()), 4)  # kept indices only
    # No centroid is spent on the zeros, so the kept values fit better than when clustered with them.
    blind = decode(sparse_encoding(mask, quantize_kmeans(pruned, 4, "per_channel", 20)))
    assert (decoded - pruned).norm() < 0.7 * (blind - pruned).norm()
    mask_back, inner = unwrap(encoding)
    assert torch.equal(mask_back, mask) and torch.equal(decode(inner) * mask, decoded)


def test_prune_then_kmeans_step_keeps_masks_and_halves_the_indices() -> None:
    state = ModelState(tiny_bert())
    steps = [{"type": "prune", "method": "magnitude", "sparsity": 0.5}, {"type": "quantize", "method": "kmeans"}]
    run_pipeline(state, JobSpec.model_validate({"steps": steps}).steps, StepContext())
    pruned = {name: e for name, e in state.encodings.items() if e.format == SPARSE_BITMASK}
    assert pruned and all(e.format == "kmeans" for n, e in state.encodings.items() if n not in pruned)  # embeddings
    for name, encoding in pruned.items():
        weight = state.model.get_parameter(name)
        assert encoding.meta["inner_format"] == "kmeans" and encoding.meta["compacted_packed"] == ["indices"]
        assert torch.equal(decode(encoding), weight)
        assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
