"""Chunked uploads staged in the bucket (core/service/s3_staging.py), in one API process: parts and tails, the sha256
read back when this process did not see every byte, a mismatch that resets the file, one writer per file, nothing on
the API host's disk. tests/storage/test_s3_fleet.py runs two API processes against each other."""

from pathlib import Path

import pytest
from sqlalchemy import delete

from core.service import s3_staging
from core.service.db.models import Upload
from core.service.db.session import session_scope
from core.service.s3_staging import FileLock, S3Staging, remove_orphaned_staging
from core.service.settings import get_settings
from core.service.storage import get_store
from tests.api.test_uploads import manifest, put, start
from tests.fixtures.api import leftovers
from tests.storage.helpers import MiB, object_keys

PIECE = 3 * MiB  # not a multiple of the 5 MiB parts: every PUT leaves a tail


def multipart_uploads(upload_id: str) -> list[str]:
    """Keys of the multipart uploads in progress under the upload's staging."""
    store = get_store()
    prefix = f"{store.prefix}/uploads/{upload_id}/"
    listed = store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=prefix).get("Uploads", [])
    return [item["Key"].removeprefix(f"{store.prefix}/") for item in listed]


def pieces(client, auth, upload_id: str, path: Path, forget_hash: bool = False) -> list[dict]:
    data, answers = path.read_bytes(), []
    for first in range(0, len(data), PIECE):
        body = data[first:first + PIECE]
        if forget_hash:  # as if each PUT went to another host
            s3_staging._DIGESTS.clear()
        response = put(client, auth, upload_id, path.name, body, f"bytes {first}-{first + len(body) - 1}/{len(data)}")
        assert response.status_code == 200, response.text
        answers.append(response.json())
    return answers


@pytest.mark.parametrize("forget_hash", [False, True], ids=["hash-continued", "hash-read-back"])
def test_a_file_in_pieces_is_staged_as_parts_and_tails_then_becomes_a_model(client, auth, small_parts, big_bert,
                                                                            forget_hash):
    upload = start(client, auth, big_bert)
    weights = big_bert / "model.safetensors"
    answers = pieces(client, auth, upload["id"], weights, forget_hash)
    assert [a["received"] for a in answers] == [min(i * PIECE, weights.stat().st_size) for i in range(1, 5)]
    assert [a["complete"] for a in answers] == [False, False, False, True]
    staged = object_keys(get_store(), f"uploads/{upload['id']}/")
    assert staged == [f"uploads/{upload['id']}/{where}/model.safetensors" for where in ("checked", "files", "verified")]
    assert put(client, auth, upload["id"], "config.json", (big_bert / "config.json").read_bytes()).status_code == 200
    response = client.post(f"/v1/uploads/{upload['id']}/complete", headers=auth)
    assert response.status_code == 201, response.text
    model = response.json()
    assert object_keys(get_store(), "uploads/") == []
    assert leftovers() == []  # nothing of the upload on this host's disk
    fetched = get_store().local_tree(f"models/{model['id']}", get_settings().work_dir / "check")
    assert (fetched / "model.safetensors").read_bytes() == weights.read_bytes()


def test_progress_resumes_from_parts_and_tail(client, auth, small_parts, big_bert):
    upload = start(client, auth, big_bert)
    data = (big_bert / "model.safetensors").read_bytes()
    first = 7 * MiB  # one full part and a 2 MiB tail
    assert put(client, auth, upload["id"], "model.safetensors", data[:first],
               f"bytes 0-{first - 1}/{len(data)}").json()["received"] == first
    files = {f["path"]: f for f in client.get(f"/v1/uploads/{upload['id']}", headers=auth).json()["files"]}
    assert files["model.safetensors"]["received"] == first and not files["model.safetensors"]["complete"]
    wrong = put(client, auth, upload["id"], "model.safetensors", data[:10], f"bytes 0-9/{len(data)}")
    assert wrong.status_code == 409 and wrong.json()["error"]["details"]["received"] == first
    s3_staging._DIGESTS.clear()
    rest = put(client, auth, upload["id"], "model.safetensors", data[first:],
               f"bytes {first}-{len(data) - 1}/{len(data)}")
    assert rest.status_code == 200 and rest.json()["complete"], rest.text


@pytest.mark.parametrize("forget_hash", [False, True], ids=["hash-continued", "hash-read-back"])
def test_a_mismatch_resets_the_file_to_zero(client, auth, small_parts, big_bert, forget_hash):
    upload = start(client, auth, big_bert)
    data = bytearray((big_bert / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    last = len(data) - 1
    if forget_hash:  # the first bytes went to another host: the assembled file is hashed from the bucket
        assert put(client, auth, upload["id"], "model.safetensors", bytes(data[:PIECE]),
                   f"bytes 0-{PIECE - 1}/{len(data)}").status_code == 200
        s3_staging._DIGESTS.clear()
    first = PIECE if forget_hash else 0
    response = put(client, auth, upload["id"], "model.safetensors", bytes(data[first:]),
                   f"bytes {first}-{last}/{len(data)}")
    assert response.status_code == 422 and response.json()["error"]["code"] == "checksum_mismatch", response.text
    files = {f["path"]: f for f in client.get(f"/v1/uploads/{upload['id']}", headers=auth).json()["files"]}
    assert files["model.safetensors"]["received"] == 0
    assert object_keys(get_store(), f"uploads/{upload['id']}/") == []
    assert multipart_uploads(upload["id"]) == []


def test_one_writer_per_file_across_hosts(client, auth, small_parts, big_bert):
    upload = start(client, auth, big_bert)
    staging = S3Staging(get_store(), upload["id"], get_settings())
    lock = FileLock(get_settings(), staging.file_key("model.safetensors"))
    assert lock.acquire()  # another host is writing this file
    try:
        busy = put(client, auth, upload["id"], "model.safetensors", b"x" * 10)
        assert busy.status_code == 409 and "another request" in busy.json()["error"]["message"]
        assert put(client, auth, upload["id"], "config.json",
                   (big_bert / "config.json").read_bytes()).status_code == 200  # other files are free
    finally:
        lock.release()
    assert put(client, auth, upload["id"], "model.safetensors",
               (big_bert / "model.safetensors").read_bytes()).json()["complete"]


def test_delete_removes_parts_tails_and_multipart_uploads(client, auth, small_parts, big_bert):
    upload = start(client, auth, big_bert)
    data = (big_bert / "model.safetensors").read_bytes()
    put(client, auth, upload["id"], "model.safetensors", data[:7 * MiB], f"bytes 0-{7 * MiB - 1}/{len(data)}")
    assert multipart_uploads(upload["id"]) == [f"uploads/{upload['id']}/files/model.safetensors"]
    assert client.delete(f"/v1/uploads/{upload['id']}", headers=auth).status_code == 204
    assert object_keys(get_store(), "uploads/") == []
    assert multipart_uploads(upload["id"]) == []
    assert manifest(big_bert)  # the folder is untouched


def test_the_sweeper_removes_staging_whose_upload_row_is_gone(client, auth, small_parts, big_bert):
    data = (big_bert / "model.safetensors").read_bytes()
    kept, orphan = start(client, auth, big_bert), start(client, auth, big_bert)
    for upload in (kept, orphan):  # a full part in flight (multipart only) and a tail object
        put(client, auth, upload["id"], "model.safetensors", data[:7 * MiB], f"bytes 0-{7 * MiB - 1}/{len(data)}")
    with session_scope() as session:  # a host died after deleting the row, before deleting the objects
        session.execute(delete(Upload).where(Upload.id == orphan["id"]))
    with session_scope() as session:
        assert remove_orphaned_staging(session, get_store(), get_settings()) == 1
    assert object_keys(get_store(), f"uploads/{orphan['id']}/") == [] and multipart_uploads(orphan["id"]) == []
    assert multipart_uploads(kept["id"]) and object_keys(get_store(), f"uploads/{kept['id']}/")
    rest = put(client, auth, kept["id"], "model.safetensors", data[7 * MiB:],
               f"bytes {7 * MiB}-{len(data) - 1}/{len(data)}")
    assert rest.status_code == 200 and rest.json()["complete"], rest.text
