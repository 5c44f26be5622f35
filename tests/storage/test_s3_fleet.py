"""A fleet of API hosts with no shared disk: two real API processes (uvicorn) with their own var folders, sharing
PostgreSQL, Redis and the bucket (moto's server), as behind a load balancer. The pieces of one chunked upload
alternate between them, one PUT is cut off mid-body and resumed on the other host, and the upload completes into a
model on either: its staging lives in the bucket, not on the host that took a piece."""

import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cli.stack import free_port, spawn, stop_processes, wait_ready
from core.service.chunked_uploads import manifest_sha256
from core.service.storage.s3 import S3ArtifactStore
from tests.fixtures.environment import E2E_BROKER_URL
from tests.fixtures.services import create_key
from tests.models import save_model_folder, tiny_bert
from tests.storage.helpers import AWS_ENV, MiB, object_keys, s3_settings

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
PIECE = 3 * MiB  # parts are 5 MiB: most pieces end inside a part, so the next host starts from a tail


class Fleet:
    """Two API hosts: same database, broker and bucket; each its own var and scratch folders."""

    def __init__(self, root: Path, settings: dict[str, str], key: str) -> None:
        self.root, self.processes, self.urls = root, list[subprocess.Popen](), list[str]()
        self.common = {**os.environ, **AWS_ENV, **settings, "MCS_BROKER_URL": E2E_BROKER_URL, "PYTHONUNBUFFERED": "1"}
        self.headers = {"Authorization": f"Bearer {key}"}

    def start(self, count: int = 2) -> list[httpx.Client]:
        for host in range(count):
            port, var = free_port(), self.root / f"api{host}" / "var"
            env = {**self.common, "MCS_VAR_DIR": str(var), "MCS_ARTIFACT_DIR": str(var / "artifacts")}
            var.mkdir(parents=True)
            self.processes.append(spawn([sys.executable, "-m", "cli.main", "serve", "--port", str(port)], env,
                                        self.root / f"api{host}.log"))
            self.urls.append(f"http://127.0.0.1:{port}")
        for url in self.urls:
            wait_ready(url, self.processes)
        return [httpx.Client(base_url=url, headers=self.headers, timeout=60) for url in self.urls]

    def files_on_disk(self) -> list[str]:
        """Every file either host wrote under its var folder that names an upload (staging of its own)."""
        return sorted(str(p) for p in self.root.rglob("*") if "upl_" in str(p.relative_to(self.root)))


@pytest.fixture(scope="module")
def fleet(database_url, s3_endpoint, s3_bucket, tmp_path_factory) -> Iterator[tuple[Fleet, list[httpx.Client]]]:
    settings = s3_settings(s3_endpoint, s3_bucket, "fleet", s3_multipart_chunk_bytes=str(5 * MiB))
    fleet = Fleet(tmp_path_factory.mktemp("fleet"), settings, create_key(database_url, "fleet"))
    fleet.store = S3ArtifactStore(s3_bucket, "fleet", s3_endpoint)
    try:
        clients = fleet.start()
        yield fleet, clients
        for client in clients:
            client.close()
    finally:
        stop_processes(fleet.processes)


@pytest.fixture(scope="module")
def big_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model_folder(tiny_bert(vocab_size=45_000), tmp_path_factory.mktemp("big-bert"))  # 11.6 MB weights


def manifest(folder: Path) -> list[dict]:
    return [{"path": f.name, "size": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
            for f in sorted(folder.iterdir())]


def put_piece(client: httpx.Client, upload_id: str, name: str, data: bytes, first: int, last: int) -> dict:
    response = client.put(f"/v1/uploads/{upload_id}/files/{name}", content=data[first:last + 1],
                          headers={"Content-Type": "application/octet-stream",
                                   "Content-Range": f"bytes {first}-{last}/{len(data)}"})
    assert response.status_code == 200, response.text
    return response.json()


def cut_off_put(url: str, headers: dict, upload_id: str, name: str, data: bytes, first: int, sent: int) -> None:
    """A PUT announcing a piece of PIECE bytes whose connection drops after `sent` of them."""
    host, port = url.removeprefix("http://").split(":")
    last = min(first + PIECE, len(data)) - 1
    head = (f"PUT /v1/uploads/{upload_id}/files/{name} HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: {headers['Authorization']}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Range: bytes {first}-{last}/{len(data)}\r\nContent-Length: {last - first + 1}\r\n\r\n")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head.encode() + data[first:first + sent])


def received(client: httpx.Client, upload_id: str, name: str) -> int:
    files = client.get(f"/v1/uploads/{upload_id}").json()["files"]
    return next(f["received"] for f in files if f["path"] == name)


def wait_received(client: httpx.Client, upload_id: str, name: str, expected: int) -> int:
    """The bytes received once the host that lost the connection has written them (polled, at most 30 s)."""
    deadline = time.monotonic() + 30
    while (now := received(client, upload_id, name)) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    return now


def test_pieces_alternate_between_hosts_a_cut_off_piece_resumes_and_either_host_completes(fleet, big_bert):
    fleet, (one, two) = fleet
    upload = one.post("/v1/uploads", json={"name": "fleet", "files": manifest(big_bert)})
    assert upload.status_code == 201, upload.text
    upload_id = upload.json()["id"]
    data = (big_bert / "model.safetensors").read_bytes()

    assert put_piece(one, upload_id, "model.safetensors", data, 0, PIECE - 1)["received"] == PIECE
    assert put_piece(two, upload_id, "model.safetensors", data, PIECE, 2 * PIECE - 1)["received"] == 2 * PIECE
    # host one loses the client 1 MiB into the third piece; what arrived is kept, and host two sees it
    cut_off_put(fleet.urls[0], fleet.headers, upload_id, "model.safetensors", data, 2 * PIECE, MiB)
    assert wait_received(two, upload_id, "model.safetensors", 2 * PIECE + MiB) == 2 * PIECE + MiB
    resumed = put_piece(two, upload_id, "model.safetensors", data, 2 * PIECE + MiB, 3 * PIECE - 1)
    assert resumed["received"] == 3 * PIECE and not resumed["complete"]
    last = put_piece(one, upload_id, "model.safetensors", data, 3 * PIECE, len(data) - 1)
    assert last["received"] == len(data) and last["complete"], last
    config = (big_bert / "config.json").read_bytes()
    assert put_piece(two, upload_id, "config.json", config, 0, len(config) - 1)["complete"]

    completed = two.post(f"/v1/uploads/{upload_id}/complete")
    assert completed.status_code == 201, completed.text
    model = completed.json()
    assert model["sha256"] == manifest_sha256(manifest(big_bert)) and model["architecture"] == "BertModel"
    assert one.get(f"/v1/models/{model['id']}").status_code == 200
    assert one.get(f"/v1/uploads/{upload_id}").status_code == 404
    assert object_keys(fleet.store, "uploads/") == []  # the staging went with the completion
    assert f"models/{model['id']}/tree.json" in object_keys(fleet.store, "models/")
    assert fleet.files_on_disk() == []  # neither host kept a piece of the upload
