"""float8 e4m3 weight-only storage."""

import torch

from core.compression.encoding import decode
from core.compression.quant.fp8 import quantize_fp8
from tests.core.quant_helpers import cosine_vs_fp32, quantize_with
from tests.models import tiny_bert


def test_scale_maps_the_row_maximum_to_448_and_representable_values_survive() -> None:
    weight = torch.tensor([[448.0, -224.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [-2.0, 1.0, 0.25, 1.5]])
    encoding = quantize_fp8(weight, "per_channel")
    assert encoding.tensors["qweight"].dtype == torch.float8_e4m3fn
    assert torch.equal(encoding.tensors["scale"], torch.tensor([[1.0], [1.0], [2 / 448]]))
    assert torch.equal(decode(encoding)[:2], weight[:2])
    assert torch.allclose(decode(encoding)[2], weight[2], rtol=2**-4)


def test_fp8_step_is_nearly_lossless_and_stores_one_byte_per_weight() -> None:
    state, report = quantize_with(tiny_bert(), method="fp8")
    assert cosine_vs_fp32(tiny_bert(), state.model) >= 0.999
    assert 0.25 <= report.metrics["stored_ratio"] < 0.3
