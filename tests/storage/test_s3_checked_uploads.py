"""Chunked uploads into the bucket check a safetensors file's header, layout and values as its bytes stream by
(`StreamCheck`), so completion validates the folder from the headers alone and reads no weight back; a file that
fails a check is validated from a download, exactly as before. Parts go up several at once: one that fails leaves
the upload where the parts stored before it end, and the client resumes from there."""

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core.compression.safetensors_check import StreamCheck, check_safetensors
from core.errors import Unavailable, UnsafeInput
from core.service import s3_staging
from core.service.s3_staging import S3Staging
from core.service.settings import get_settings
from core.service.storage import get_store
from tests.api.test_uploads import put, start
from tests.models import save_model_folder, tiny_bert
from tests.storage.helpers import MiB, object_keys

PIECE = 3 * MiB


def streamed(data: bytes, piece: int) -> StreamCheck:
    check = StreamCheck(len(data))
    for first in range(0, len(data), piece):
        check.update(data[first:first + piece])
    return check


def header_of(data: bytes) -> bytes:
    return data[:8 + struct.unpack("<Q", data[:8])[0]]


@pytest.mark.parametrize("piece", [1, 3, 7, 4096, 1 << 30])
def test_stream_check_agrees_with_check_safetensors(tmp_path: Path, piece: int):
    tensors = {"a": torch.randn(33, 7, dtype=torch.bfloat16), "b": torch.randn(5), "i": torch.arange(9),
               "h": torch.randn(3, 3).half(), "empty": torch.zeros(0)}
    save_file(tensors, tmp_path / "good.safetensors")
    good = (tmp_path / "good.safetensors").read_bytes()
    check_safetensors(tmp_path / "good.safetensors")
    assert streamed(good, piece).header == header_of(good)

    tensors["a"][10, 3] = float("inf")  # a value whose bytes may straddle two pieces
    save_file(tensors, tmp_path / "bad.safetensors")
    bad = (tmp_path / "bad.safetensors").read_bytes()
    with pytest.raises(UnsafeInput, match="NaN or Inf"):
        check_safetensors(tmp_path / "bad.safetensors")
    check = streamed(bad, piece)
    assert check.header is None and "NaN or Inf" in (check.problem or "")


def test_stream_check_refuses_short_long_and_malformed_files():
    header = json.dumps({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    data = struct.pack("<Q", len(header)) + header + b"\0" * 8
    assert streamed(data, 5).header == data[:-8]
    short = StreamCheck(len(data) + 4)
    short.update(data + b"\0" * 4)  # 4 bytes past the tensors' end
    assert short.header is None and "short of" in (short.problem or "")
    long = StreamCheck(len(data) - 1)
    long.update(data)
    assert long.header is None and long.problem
    assert "header length" in (streamed(data[:20], 3).problem or "")
    assert "not valid JSON" in (streamed(struct.pack("<Q", 4) + b"{no}", 3).problem or "")


@pytest.fixture(scope="module")
def nan_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tiny_bert(vocab_size=45_000)
    with torch.no_grad():
        model.encoder.layer[1].output.dense.weight[0, 0] = float("nan")  # near the end of the file
    return save_model_folder(model, tmp_path_factory.mktemp("nan-bert"))


def send(client, auth, upload_id: str, path: Path, forget_hash: bool = False) -> dict:
    data, answer = path.read_bytes(), {}
    for first in range(0, len(data), PIECE):
        if forget_hash:  # as if each PUT went to another host: the file is read back once assembled
            s3_staging._DIGESTS.clear()
        body = data[first:first + PIECE]
        response = put(client, auth, upload_id, path.name, body, f"bytes {first}-{first + len(body) - 1}/{len(data)}")
        assert response.status_code == 200, response.text
        answer = response.json()
    return answer


def downloads(monkeypatch) -> list[str]:
    """The keys the store's client downloads from now on."""
    client, keys = get_store().client, []
    original = client.download_file

    def spy(bucket, key, filename, *args, **kwargs):
        keys.append(key)
        return original(bucket, key, filename, *args, **kwargs)

    monkeypatch.setattr(client, "download_file", spy)
    return keys


@pytest.mark.parametrize("forget_hash", [False, True], ids=["checked-as-sent", "checked-read-back"])
def test_completion_reads_the_header_of_a_checked_file_not_its_weights(client, auth, small_parts, big_bert,
                                                                       monkeypatch, forget_hash):
    upload = start(client, auth, big_bert)
    weights = big_bert / "model.safetensors"
    assert send(client, auth, upload["id"], weights, forget_hash)["complete"]
    send(client, auth, upload["id"], big_bert / "config.json")
    checked = f"uploads/{upload['id']}/checked/model.safetensors"
    assert checked in object_keys(get_store(), f"uploads/{upload['id']}/")
    assert b"".join(get_store().read_range(checked, 0, MiB)) == header_of(weights.read_bytes())
    downloaded = downloads(monkeypatch)
    response = client.post(f"/v1/uploads/{upload['id']}/complete", headers=auth)
    assert response.status_code == 201, response.text
    assert [key.rsplit("/", 1)[-1] for key in downloaded] == ["config.json"]
    model = response.json()
    assert model["num_parameters"] == sum(p.numel() for p in tiny_bert(vocab_size=45_000).parameters())
    fetched = get_store().local_tree(f"models/{model['id']}", get_settings().work_dir / "check")
    assert (fetched / "model.safetensors").read_bytes() == weights.read_bytes()


@pytest.mark.parametrize("forget_hash", [False, True], ids=["checked-as-sent", "checked-read-back"])
def test_non_finite_weights_are_downloaded_and_refused_at_completion(client, auth, small_parts, nan_bert, monkeypatch,
                                                                     forget_hash):
    upload = start(client, auth, nan_bert)
    assert send(client, auth, upload["id"], nan_bert / "model.safetensors", forget_hash)["complete"]
    send(client, auth, upload["id"], nan_bert / "config.json")
    assert not [key for key in object_keys(get_store(), f"uploads/{upload['id']}/") if "/checked/" in key]
    downloaded = downloads(monkeypatch)
    response = client.post(f"/v1/uploads/{upload['id']}/complete", headers=auth)
    assert response.status_code == 400 and response.json()["error"]["code"] == "unsafe_input", response.text
    assert "NaN or Inf" in response.json()["error"]["message"]
    assert sorted(key.rsplit("/", 1)[-1] for key in downloaded) == ["config.json", "model.safetensors"]
    assert client.get(f"/v1/uploads/{upload['id']}", headers=auth).status_code == 404  # discarded
    assert object_keys(get_store(), "uploads/") == [] and object_keys(get_store(), "models/") == []


def test_a_failed_part_leaves_the_parts_before_it_and_the_put_resumes(client, auth, small_parts, big_bert,
                                                                      monkeypatch):
    upload = start(client, auth, big_bert)
    data = (big_bert / "model.safetensors").read_bytes()
    original, failures = S3Staging.send_part, []

    def flaky(self, name, multipart_id, number, body):
        if number == 2 and not failures:
            failures.append(number)
            raise Unavailable("the object store failed on part 2")
        return original(self, name, multipart_id, number, body)

    monkeypatch.setattr(S3Staging, "send_part", flaky)
    response = put(client, auth, upload["id"], "model.safetensors", data)
    assert response.status_code == 503, response.text
    files = {f["path"]: f for f in client.get(f"/v1/uploads/{upload['id']}", headers=auth).json()["files"]}
    assert files["model.safetensors"]["received"] == 5 * MiB  # part 1; part 2 failed, nothing after it counts
    rest = put(client, auth, upload["id"], "model.safetensors", data[5 * MiB:],
               f"bytes {5 * MiB}-{len(data) - 1}/{len(data)}")
    assert rest.status_code == 200 and rest.json()["complete"], rest.text
    send(client, auth, upload["id"], big_bert / "config.json")
    response = client.post(f"/v1/uploads/{upload['id']}/complete", headers=auth)
    assert response.status_code == 201, response.text
    fetched = get_store().local_tree(f"models/{response.json()['id']}", get_settings().work_dir / "check")
    assert (fetched / "model.safetensors").read_bytes() == data
