"""Big tensors are read and decoded by chunks of rows (`read_upcast`, `decoded`) so that a 7B model's embeddings and
head never need their stored copy or a whole-tensor decode's temporaries beside the float32 result; the values must
be exactly those of the whole-tensor path."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core.compression import sequential
from core.compression.encoding import decode, quantize_rtn
from core.compression.sequential import decoded, read_upcast

# (bits, granularity, group size, symmetric): packed_int by group and by row (whole bytes and a 3-bit stream), and
# int8 per row; per-tensor scales are decoded whole.
ENCODINGS = [(4, "per_group", 32, True), (3, "per_group", 16, False), (5, "per_channel", None, True),
             (8, "per_channel", None, True), (8, "per_channel", None, False), (4, "per_tensor", None, True)]


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sequential, "CHUNK_ELEMENTS", 1000)  # chunks of a few rows on tensors of a few thousand


@pytest.mark.parametrize("shape", [(100, 37), (33, 129)])
@pytest.mark.parametrize("encoding", ENCODINGS, ids=[f"{e[0]}bit-{e[1]}" for e in ENCODINGS])
def test_a_chunked_decode_equals_the_whole_one(small_chunks: None, shape: tuple[int, int],
                                               encoding: tuple[int, str, int | None, bool]) -> None:
    bits, granularity, group_size, symmetric = encoding
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    encoded = quantize_rtn(weight, bits, granularity, symmetric, group_size)  # type: ignore[arg-type]
    assert torch.equal(decoded(encoded), decode(encoded))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int64])
def test_a_chunked_upcast_equals_the_whole_one(small_chunks: None, tmp_path: Path, dtype: torch.dtype) -> None:
    tensor = (torch.randn(301, 17) * 100).to(dtype)
    save_file({"weight": tensor, "norm": torch.ones(17, dtype=dtype)}, tmp_path / "model.safetensors")
    read = read_upcast(tmp_path / "model.safetensors", "weight")
    expected = tensor.float() if dtype.is_floating_point else tensor
    assert read.dtype == expected.dtype and torch.equal(read, expected)
    assert torch.equal(read_upcast(tmp_path / "model.safetensors", "norm"), torch.ones(17, dtype=dtype).float()
                       if dtype.is_floating_point else torch.ones(17, dtype=dtype))
