"""Golden tests of the int8 round-to-nearest arithmetic and the decoder registry."""

import pytest
import torch
from torch import nn

from core.compression.encoding import decode, decode_into, quantize_rtn
from core.compression.state import Encoding
from core.errors import UnsupportedModel

# Rows [0, 1, 2, 3] and [4, 5, 6, 7]: no value lands on a rounding tie, so the expected codes are exact.
WEIGHT = torch.arange(8, dtype=torch.float32).reshape(2, 4)


def assert_within_half_step(decoded: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> None:
    """Round to nearest: no value moves by more than half a quantization step (plus float rounding)."""
    assert ((decoded - weight).abs() <= scale / 2 + 1e-6).all()


def test_symmetric_per_channel_golden() -> None:
    encoding = quantize_rtn(WEIGHT, granularity="per_channel")
    assert encoding.format == "int8_rtn"
    assert encoding.tensors["qweight"].dtype == torch.int8
    assert torch.equal(
        encoding.tensors["qweight"], torch.tensor([[0, 42, 85, 127], [73, 91, 109, 127]], dtype=torch.int8)
    )
    assert torch.equal(encoding.tensors["scale"], torch.tensor([[3 / 127], [7 / 127]], dtype=torch.float32))
    assert "zero_point" not in encoding.tensors
    assert_within_half_step(decode(encoding), WEIGHT, encoding.tensors["scale"])


def test_symmetric_per_tensor_golden() -> None:
    encoding = quantize_rtn(WEIGHT, granularity="per_tensor")
    expected = torch.tensor([[0, 18, 36, 54], [73, 91, 109, 127]], dtype=torch.int8)
    assert torch.equal(encoding.tensors["qweight"], expected)
    assert torch.equal(encoding.tensors["scale"], torch.tensor([[7 / 127]], dtype=torch.float32))


def test_asymmetric_zero_point_golden() -> None:
    # Row 0 spans [-2, 1]: scale 3/255, zero point 42. Row 1 is all positive, so its range is widened to [0, 5].
    weight = WEIGHT - 2
    encoding = quantize_rtn(weight, granularity="per_channel", symmetric=False)
    assert torch.equal(
        encoding.tensors["qweight"], torch.tensor([[-128, -43, 42, 127], [-26, 25, 76, 127]], dtype=torch.int8)
    )
    assert torch.equal(encoding.tensors["zero_point"], torch.tensor([[42], [-128]], dtype=torch.int8))
    assert torch.equal(encoding.tensors["scale"], torch.tensor([[3 / 255], [5 / 255]], dtype=torch.float32))
    assert_within_half_step(decode(encoding), weight, encoding.tensors["scale"])


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_zero_weights_decode_to_exact_zeros(granularity: str, symmetric: bool) -> None:
    weight = torch.zeros(3, 4)
    weight[1] = torch.tensor([0.5, -1.0, 0.25, 2.0]) if granularity == "per_channel" else 0.0
    encoding = quantize_rtn(weight, granularity=granularity, symmetric=symmetric)
    decoded = decode(encoding)
    assert torch.isfinite(encoding.tensors["scale"]).all() and (encoding.tensors["scale"] > 0).all()
    assert torch.equal(decoded[0], torch.zeros(4)) and torch.equal(decoded[2], torch.zeros(4))
    assert_within_half_step(decoded, weight, encoding.tensors["scale"])


def test_per_channel_beats_per_tensor_on_rows_of_different_scale() -> None:
    weight = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * torch.tensor([[0.01], [0.1], [1], [10]])
    errors = {
        granularity: (decode(quantize_rtn(weight, granularity=granularity)) - weight).abs()[0].max().item()
        for granularity in ("per_channel", "per_tensor")
    }
    assert errors["per_channel"] < errors["per_tensor"] / 100


def test_embedding_gets_one_scale_per_token_row() -> None:
    embedding = nn.Embedding(10, 6)
    encoding = quantize_rtn(embedding.weight)
    assert encoding.tensors["scale"].shape == (10, 1)
    assert encoding.tensors["qweight"].shape == (10, 6)
    assert encoding.nbytes() == 10 * 6 + 10 * 4


def test_bad_arguments_and_unknown_format_are_rejected() -> None:
    with pytest.raises(ValueError, match="bits"):
        quantize_rtn(WEIGHT, bits=16)
    with pytest.raises(ValueError, match="granularity"):
        quantize_rtn(WEIGHT, granularity="per_group")  # type: ignore[arg-type]
    with pytest.raises(UnsupportedModel, match="nf4"):
        decode(Encoding(format="nf4", tensors={}))


def test_int8_rows_in_blocks_match_the_whole_tensor_formula_and_decode_in_place() -> None:
    torch.manual_seed(0)
    weight = torch.randn(3000, 200)  # several row blocks of the fast path
    weight[7] = 0.0  # an all-zero row keeps scale 1
    encoding = quantize_rtn(weight, 8, "per_channel", True)
    scale = weight.abs().amax(dim=1, keepdim=True) / 127
    scale[7] = 1.0
    reference = torch.clamp(torch.round(weight / scale), -127, 127)
    assert torch.allclose(encoding.tensors["scale"], scale)
    assert (encoding.tensors["qweight"].float() - reference).abs().max() <= 1  # x·(1/s) vs x/s at exact ties
    into = torch.empty_like(weight)
    decode_into(encoding, into)
    assert torch.equal(into, decode(encoding))
