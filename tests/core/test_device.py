"""The same arithmetic on whichever device a worker has: the `device` fixture is CUDA for tests marked `gpu`
(skipped without CUDA) and the CPU otherwise, so each case runs here and, on a GPU machine, there too."""

import pytest
import torch

from core.compression.encoding import decode, quantize_rtn

CASES = [{"bits": 8, "granularity": "per_channel"},
         {"bits": 4, "granularity": "per_group", "group_size": 16, "symmetric": False}]


def _weight() -> torch.Tensor:
    return torch.randn(64, 48, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("fields", CASES)
def test_rtn_on_the_cpu_decodes_within_half_a_step(device: torch.device, fields: dict) -> None:
    weight = _weight().to(device)
    decoded = decode(quantize_rtn(weight, **fields))
    assert decoded.device.type == device.type == "cpu"
    assert (decoded - weight).abs().max() <= weight.abs().max() / (2 ** (fields["bits"] - 1) - 1)


@pytest.mark.gpu
@pytest.mark.parametrize("fields", CASES)
def test_rtn_on_cuda_matches_the_cpu(device: torch.device, fields: dict) -> None:
    on_gpu = decode(quantize_rtn(_weight().to(device), **fields))
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), decode(quantize_rtn(_weight(), **fields)), rtol=0, atol=1e-6)
