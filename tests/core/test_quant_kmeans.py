"""k-means weight sharing: decoded weights stay on their codebook, clustered data is recovered exactly."""

import pytest
import torch

from core.compression.encoding import decode, quantize_rtn
from core.compression.quant.kmeans import quantize_kmeans
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


def test_kmeans_per_row_beats_rtn_at_the_same_bits() -> None:
    weight = torch.randn(16, 256, generator=torch.Generator().manual_seed(1)) ** 3  # heavy tails
    kmeans_error = (decode(quantize_kmeans(weight, 4, "per_channel", 20)) - weight).norm()
    rtn_error = (decode(quantize_rtn(weight, bits=4, granularity="per_channel")) - weight).norm()
    assert kmeans_error < 0.9 * rtn_error


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama])
def test_kmeans_step_on_tiny_models(build) -> None:  # noqa: ANN001
    state, report = quantize_with(build(), method="kmeans", bits=4)
    assert cosine_vs_fp32(build(), state.model) >= 0.98
    assert all(encoding.format == "kmeans" for encoding in state.encodings.values())
    assert report.metrics["bits"] == 4
