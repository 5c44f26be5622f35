"""Safetensors files are checked by our own parser before any library reads them."""

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core.compression.safetensors_check import MAX_HEADER_BYTES, check_safetensors
from core.errors import UnsafeInput
from tests.fixtures.api import leftovers, zip_folder

pytestmark = pytest.mark.safety


def raw_file(path: Path, header: bytes | dict, data: bytes = b"", length: int | None = None) -> Path:
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded) if length is None else length) + encoded + data)
    return path


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_a_file_written_by_safetensors_passes(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.ones(3, 4), "b": torch.zeros(2, dtype=torch.bfloat16), "c": torch.arange(5)}, path,
              metadata={"format": "pt"})
    assert set(check_safetensors(path)) == {"a", "b", "c"}


@pytest.mark.parametrize(("length", "message"), [(0, "header length 0 "), (2**63, "header length 9,223"),
                                                 (200 * 1024**2, "header length 209,715,200")])
def test_impossible_header_lengths(tmp_path, length, message):
    path = raw_file(tmp_path / "h.safetensors", {}, length=length)
    with pytest.raises(UnsafeInput, match=message):
        check_safetensors(path)
    assert MAX_HEADER_BYTES < 200 * 1024**2


@pytest.mark.parametrize(("header", "data", "message"), [
    ({"w": entry("F32", [10**9], 0, 16)}, b"\0" * 16, "needs 4,000,000,000 bytes"),
    ({"w": entry("F32", [2**62, 2**62], 0, 16)}, b"\0" * 16, "needs"),
    ({"w": entry("F32", [4], 0, 16), "v": entry("F32", [4], 16, 32)}, b"\0" * 16, "past the end"),
    ({"w": entry("F32", [4], 0, 16), "v": entry("F32", [4], 8, 24)}, b"\0" * 24, "overlaps"),
    ({"w": entry("F32", [4], 0, 16)}, b"\0" * 20, "short of the file"),
    ({"w": entry("F32", [2], 8, 16)}, b"\0" * 16, "leaves a gap"),
    ({"w": entry("Q4", [4], 0, 2)}, b"\0" * 2, "unknown dtype 'Q4'"),
    ({"w": entry("F32", [-1], 0, 0)}, b"", "non-negative integers"),
    ({"w": entry("F32", [1.5], 0, 4)}, b"\0" * 4, "non-negative integers"),
    ({"w": {**entry("F32", [1], 0, 4), "extra": 1}}, b"\0" * 4, "exactly dtype"),
    ({"__metadata__": {"format": 1}, "w": entry("F32", [1], 0, 4)}, b"\0" * 4, "__metadata__ must map"),
    ({"__metadata__": ["x"], "w": entry("F32", [1], 0, 4)}, b"\0" * 4, "__metadata__ must map"),
])
def test_headers_that_lie_about_the_data(tmp_path, header, data, message):
    with pytest.raises(UnsafeInput, match=message):
        check_safetensors(raw_file(tmp_path / "bad.safetensors", header, data))


def test_duplicate_tensor_names_are_refused(tmp_path):
    header = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, ' \
             b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
    with pytest.raises(UnsafeInput, match="names 'w' twice"):
        check_safetensors(raw_file(tmp_path / "dup.safetensors", header, b"\0" * 8))


def test_invalid_utf8_and_non_json_headers(tmp_path):
    with pytest.raises(UnsafeInput, match="not valid UTF-8"):
        check_safetensors(raw_file(tmp_path / "a.safetensors", b'{"\xff\xfe": 1}'))
    with pytest.raises(UnsafeInput, match="not valid JSON"):
        check_safetensors(raw_file(tmp_path / "b.safetensors", b"{not json"))
    with pytest.raises(UnsafeInput, match="JSON object"):
        check_safetensors(raw_file(tmp_path / "c.safetensors", b"[1, 2]"))


def test_random_bytes_and_a_torch_zip_named_safetensors(tmp_path):
    (tmp_path / "r.safetensors").write_bytes(bytes(range(256)) * 10)
    torch.save({"w": torch.ones(2)}, tmp_path / "t.safetensors")
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    for name in ("r", "t", "short"):
        with pytest.raises(UnsafeInput, match=f"{name}.safetensors: "):
            check_safetensors(tmp_path / f"{name}.safetensors")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(tmp_path, dtype, value):
    path = tmp_path / "nan.safetensors"
    save_file({"ok": torch.ones(4), "w": torch.full((3, 5), value, dtype=dtype)}, path)
    with pytest.raises(UnsafeInput, match="tensor 'w' holds 15 NaN or Inf values of 15"):
        check_safetensors(path)
    weights = torch.ones(100, dtype=dtype)
    weights[37] = value
    save_file({"w": weights}, path)
    with pytest.raises(UnsafeInput, match="holds 1 NaN"):
        check_safetensors(path)


def test_upload_with_nan_weights_is_400_and_leaves_nothing(client, auth, bert_folder, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_bytes((bert_folder / "config.json").read_bytes())
    from safetensors.torch import load_file

    tensors = load_file(bert_folder / "model.safetensors")
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, folder / "model.safetensors")
    response = client.post("/v1/models", files={"file": ("m.zip", zip_folder(folder), "application/zip")},
                           headers=auth)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "unsafe_input"
    assert f"model.safetensors: tensor {first!r} holds" in response.json()["error"]["message"]
    assert leftovers() == []


BIG = b"9" * 5000  # past Python's 4,300-digit limit for int(): json raises ValueError, not JSONDecodeError


@pytest.mark.parametrize("header", [
    b'{"w": {"dtype": "F32", "shape": [' + BIG + b'], "data_offsets": [0, 4]}}',
    b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, ' + BIG + b']}}',
    b'{"__metadata__": {"n": ' + BIG + b'}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
    b'{"w": {"dtype": "F32", "shape": [-' + BIG + b'], "data_offsets": [0, 4]}}',
])
def test_integers_past_the_digit_limit_are_refused(tmp_path, header):
    with pytest.raises(UnsafeInput, match="not valid JSON .*4300"):
        check_safetensors(raw_file(tmp_path / "big.safetensors", header, b"\0" * 4))


@pytest.mark.parametrize("header", [
    b'{"\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
    b'{"w\\udfff": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
    b'{"__metadata__": {"format": "\\udc80"}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
    b'{"__metadata__": {"\\ud83d": "pt"}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
])
def test_lone_surrogates_in_names_are_refused(tmp_path, header):
    """safetensors' own parser refuses them, so a job would fail reading what the upload accepted."""
    with pytest.raises(UnsafeInput, match="lone UTF-16 surrogate"):
        check_safetensors(raw_file(tmp_path / "s.safetensors", header, b"\0" * 4))


def test_a_surrogate_pair_is_a_character(tmp_path):
    header = b'{"w\\ud83d\\ude00": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    assert list(check_safetensors(raw_file(tmp_path / "p.safetensors", header, b"\0" * 4))) == ["w\U0001F600"]


def test_upload_with_a_huge_integer_in_the_header_is_400(client, auth, bert_folder, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_bytes((bert_folder / "config.json").read_bytes())
    raw_file(folder / "model.safetensors", b'{"w": {"dtype": "F32", "shape": [' + BIG + b'], "data_offsets": [0, 4]}}',
             b"\0" * 4)
    response = client.post("/v1/models", files={"file": ("m.zip", zip_folder(folder), "application/zip")},
                           headers=auth)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "unsafe_input" and leftovers() == []
