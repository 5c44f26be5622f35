"""Round-to-nearest at 2-8 bits: golden grouped arithmetic, packed storage, and accuracy on tiny models."""

from collections.abc import Callable

import pytest
import torch
from torch import nn

from core.compression.encoding import decode, quantize_rtn, quantize_rtn_
from core.compression.quant.packing import unpack_bits
from tests.core.helpers import quantize
from tests.core.quant_helpers import cosine_vs_fp32
from tests.models import tiny_bert, tiny_llama

# Row 0 = -7..7 then 8 (so group 1 of row 0 spans [0, 8]); row 1 = 2x row 0.
WEIGHT = torch.cat([torch.arange(-7.0, 9.0), 2 * torch.arange(-7.0, 9.0)]).reshape(2, 16)


def codes_of(encoding: object) -> torch.Tensor:
    rows, columns = encoding.meta["shape"]
    return unpack_bits(encoding.tensors["qweight"], encoding.meta["bits"], rows * columns).view(rows, columns)


def test_int4_symmetric_groups_golden() -> None:
    encoding = quantize_rtn(WEIGHT, bits=4, granularity="per_group", group_size=8)
    assert encoding.format == "packed_int" and encoding.tensors["qweight"].numel() == 16  # 32 codes, 2 per byte
    # Groups: row 0 [-7..0] max 7 -> scale 1, [1..8] -> 8/7; row 1 doubles both. Scales are float16.
    expected_scale = torch.tensor([[1.0, 8 / 7], [2.0, 16 / 7]]).half()
    assert torch.equal(encoding.tensors["scale"], expected_scale)
    assert "zero_point" not in encoding.tensors
    # Symmetric codes are stored unsigned: q + 8, so -7..7 -> 1..15; group 0 is exact.
    assert codes_of(encoding)[0, :8].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert torch.equal(decode(encoding)[:, :8], WEIGHT[:, :8])


def test_int4_asymmetric_integer_zero_point_golden() -> None:
    weight = torch.arange(0.0, 16.0).reshape(1, 16)  # one row, one group: range [0, 15] -> scale 1, zero point 0
    encoding = quantize_rtn(weight - 5, bits=4, granularity="per_channel", symmetric=False)
    assert encoding.tensors["scale"].tolist() == [[1.0]]
    assert encoding.tensors["zero_point"].tolist() == [[5]] and encoding.tensors["zero_point"].dtype == torch.uint8
    assert codes_of(encoding).tolist() == [list(range(16))]
    assert torch.equal(decode(encoding), weight - 5)


def test_ragged_last_group_and_per_tensor() -> None:
    weight = torch.arange(-10.0, 10.0).reshape(2, 10)  # 10 columns, groups of 4: the last group has 2
    grouped = quantize_rtn(weight, bits=4, granularity="per_group", group_size=4)
    assert grouped.tensors["scale"].shape == (2, 3)
    assert decode(grouped).shape == weight.shape
    per_tensor = quantize_rtn(weight, bits=3, granularity="per_tensor")
    assert torch.equal(per_tensor.tensors["scale"], torch.tensor([[10 / 3]]).half())  # max |w| / 3 at 3 bits
    assert ((decode(per_tensor) - weight).abs() <= per_tensor.tensors["scale"].float() / 2 + 1e-3).all()


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_error_is_at_most_half_a_step_and_zeros_stay_zero(bits: int, symmetric: bool) -> None:
    weight = torch.randn(6, 40, generator=torch.Generator().manual_seed(bits))
    weight[2] = 0
    encoding = quantize_rtn(weight, bits=bits, granularity="per_group", group_size=16, symmetric=symmetric)
    scale = encoding.tensors["scale"].float().repeat_interleave(16, dim=1)[:, :40]
    decoded = decode(encoding)
    assert ((decoded - weight).abs() <= scale / 2 + 1e-5).all()
    assert torch.equal(decoded[2], torch.zeros(40))
    assert encoding.tensors["qweight"].numel() == -(-6 * 40 * bits // 8)


@pytest.mark.parametrize(
    ("fields", "min_cosine"),
    [
        ({"bits": 4, "granularity": "per_group", "group_size": 16}, 0.99),
        ({"bits": 4, "granularity": "per_group", "group_size": 16, "symmetric": False}, 0.99),
        ({"bits": 3, "granularity": "per_channel"}, 0.9),
        ({"bits": 6, "granularity": "per_tensor", "symmetric": False}, 0.99),
    ],
)
@pytest.mark.parametrize("build", [tiny_bert, tiny_llama])
def test_low_bit_steps_stay_close_to_fp32(build: Callable[[], nn.Module], fields: dict, min_cosine: float) -> None:
    state, report = quantize(build(), **fields)
    assert cosine_vs_fp32(build(), state.model) >= min_cosine
    assert report.metrics["bits"] == fields["bits"]
    assert report.metrics["stored_ratio"] < (fields["bits"] + 2) / 32  # codes + 16-bit scales (+ zero points)


def test_int4_groups_store_about_an_eighth_of_fp32() -> None:
    state, report = quantize(tiny_llama(), bits=4, granularity="per_group", group_size=32)
    assert all(encoding.format == "packed_int" for encoding in state.encodings.values())
    assert report.metrics["stored_ratio"] == pytest.approx((4 + 16 / 32) / 32)


@pytest.mark.parametrize(("fields", "make"), [
    ({}, lambda w: w),  # the one-pass int8 path
    ({}, lambda w: w.t().contiguous().t()),  # not contiguous: encode, then decode into it
    ({"bits": 4, "granularity": "per_group", "group_size": 16, "symmetric": False}, lambda w: w),
])
def test_quantizing_in_place_writes_exactly_what_the_encoding_decodes_to(fields: dict, make: Callable) -> None:
    weight = make(torch.randn(70, 48, generator=torch.Generator().manual_seed(3)))
    weight[5] = 0  # an all-zero row keeps a usable scale
    original = weight.clone()
    expected = quantize_rtn(original, **fields)
    encoding = quantize_rtn_(weight, **fields)
    assert encoding.format == expected.format
    for name, tensor in expected.tensors.items():
        assert torch.equal(encoding.tensors[name], tensor), name
    assert torch.equal(weight, decode(expected))
    assert not torch.equal(weight, original)
