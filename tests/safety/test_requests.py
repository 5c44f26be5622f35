"""Hostile HTTP requests: multipart abuse, bad recipes, other tenants' ids, byte ranges, floods."""

import concurrent.futures
import contextlib
import hashlib
import os
import re
import select
import socket
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import NamedTuple

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient

from cli.stack import free_port, spawn, wait_ready
from core.service.db.repositories import JobRuns
from core.service.db.session import session_scope
from core.service.settings import get_settings
from core.service.storage import get_store
from tests.fixtures.api import leftovers

pytestmark = pytest.mark.safety
INT8 = {"type": "quantize", "method": "rtn", "bits": 8}


def error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


@pytest.fixture()
def small_app(db, monkeypatch) -> Iterator[TestClient]:
    """The real app built with small limits, as an operator would configure them through MCS_ variables."""
    from api.main import create_app

    for name, value in {"MCS_RATE_LIMIT_PER_MINUTE": "60",
                        "MCS_RATE_LIMIT_BURST": "5"}.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        with TestClient(create_app()) as client:
            yield client
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


def test_client_filenames_never_name_our_files(client, auth, bert_folder):
    from tests.fixtures.api import zip_folder

    for filename, expected in [("../../app.py", "app.py"), ("..\\..\\x.zip", "x"), ("a\x00b.zip", None)]:
        files = {"file": (filename, zip_folder(bert_folder), "application/zip")}
        name = client.post("/v1/models", files=files, headers=auth).json()["name"]
        assert name == expected if expected else "\x00" not in name and "/" not in name
    assert not any(p.name == "app.py" for p in get_settings().artifact_dir.rglob("*"))


def test_control_characters_in_the_name_field_are_422(client, auth, bert_folder):
    from tests.fixtures.api import zip_folder

    files = {"file": ("m.zip", zip_folder(bert_folder), "application/zip")}
    problem = error(client.post("/v1/models", files=files, data={"name": "a\x00b"}, headers=auth), 422)
    assert problem["details"][0]["field"] == "body.name" and leftovers() == []


def test_too_many_files_fields_or_a_huge_text_field(client, auth):
    files = [("file", (f"f{i}", b"x", "application/zip")) for i in range(1_001)]
    assert "Too many files" in error(client.post("/v1/models", files=files, headers=auth), 400)["message"]
    fields = {f"field{i}": "x" for i in range(100)}
    assert "Too many fields" in error(client.post("/v1/models", data=fields, files={"file": ("m", b"x")},
                                                  headers=auth), 400)["message"]
    huge = {"name": "x" * 2 * 1024**2}
    assert "exceeded" in error(client.post("/v1/models", data=huge, files={"file": ("m", b"x")}, headers=auth),
                               400)["message"].lower()
    assert leftovers() == []


def test_multipart_without_a_boundary_and_wrong_content_types(client, auth):
    no_boundary = client.post("/v1/models", content=b"--x\r\n", headers={**auth, "Content-Type": "multipart/form-data"})
    assert no_boundary.status_code in (400, 422)
    as_json = client.post("/v1/jobs", content=b"model_id=x", headers={**auth, "Content-Type": "text/plain"})
    assert as_json.status_code in (415, 422)
    assert client.post("/v1/models", json={"file": "x"}, headers=auth).status_code == 422


class Server(NamedTuple):
    address: str
    pid: int


@pytest.fixture()
def small_server(db, tmp_path) -> Iterator[Server]:
    """A real uvicorn process (TestClient buffers a request body before the app sees it) with a 1 MB limit and a
    body that pauses for 1 s timed out."""
    env = {**os.environ, "MCS_MAX_UPLOAD_BYTES": "1000000", "MCS_BODY_TIMEOUT_S": "1"}
    port = free_port()
    process = spawn([sys.executable, "-m", "cli.main", "serve", "--port", str(port)], env, tmp_path / "api.log")
    try:
        wait_ready(f"http://127.0.0.1:{port}", [process])
        yield Server(f"127.0.0.1:{port}", process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)


def raw_upload(address: str, headers: str, body: Iterator[bytes]) -> tuple[int, int]:
    """Send `body` until the server answers; return (status, bytes sent). A socket, not httpx: httpx only reads
    the answer after sending the whole (here: 5 GB) body."""
    host, port = address.split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(headers.encode())
        for chunk in body:
            if select.select([sock], [], [], 0)[0]:
                break
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        status_line = sock.recv(65536).split(b"\r\n", 1)[0]
    return int(status_line.split()[1]), sent


def multipart_chunks(total: int, size: int = 64 * 1024, chunked: bool = True) -> Iterator[bytes]:
    part = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"m.zip\"\r\n\r\n"
    for index in range(-1, total // size):
        data = part if index < 0 else b"\0" * size
        yield f"{len(data):x}\r\n".encode() + data + b"\r\n" if chunked else data


def test_chunked_body_without_length_and_a_lying_length_are_413(small_server, auth):
    request = f"POST /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: {auth['Authorization']}\r\n" \
              "Content-Type: multipart/form-data; boundary=b\r\n"
    status, sent = raw_upload(small_server.address, request + "Transfer-Encoding: chunked\r\n\r\n",
                              multipart_chunks(5 * 1024**3))
    assert status == 413 and sent < 50_000_000  # stopped near the 1 MB limit, not after 5 GB
    status, sent = raw_upload(small_server.address, request + "Content-Length: 100\r\n\r\n",
                              multipart_chunks(3_000_000, chunked=False))
    assert status in (400, 413, 422) and sent < 50_000_000
    assert leftovers() == []


def send_until_closed(address: str, head: str, limit: int = 256 * 1024**2) -> tuple[bytes, int]:
    """Send `head`, then zeros until the server closes the connection (or `limit` bytes went out); return the
    server's answer and the body bytes sent."""
    host, port = address.split(":")
    sent, chunk = 0, b"\0" * 64 * 1024
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode())
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < limit:
                sock.sendall(chunk)
                sent += len(chunk)
        return read_answer(sock), sent


def read_answer(sock: socket.socket) -> bytes:
    """One response: its head and the Content-Length bytes of its body."""
    answer = b""
    while (b"\r\n\r\n" not in answer
           or len(answer.split(b"\r\n\r\n", 1)[1]) < int(re.search(rb"content-length: (\d+)", answer, re.I)[1])):
        answer += sock.recv(65536) or b"\r\n\r\ncontent-length: 0"  # closed early: end the loop with what came
    return answer


def test_a_2_gib_body_without_a_valid_key_is_401_before_it_is_read(small_server):
    """Authentication comes before the body: no key, or a made-up one, costs the API neither the upload nor the
    parsing of a JSON body (it once cost ~6x the body in memory), and the connection is closed, not drained."""
    requests = [f"POST {path} HTTP/1.1\r\nHost: x\r\n{key}Content-Type: {kind}\r\nContent-Length: {2 * 1024**3}\r\n\r\n"
                for path, kind in [("/v1/jobs", "application/json"), ("/v1/models", "multipart/form-data; boundary=b")]
                for key in ["", "Authorization: Bearer mcs_made-up\r\n"]]
    server = psutil.Process(small_server.pid)
    send_until_closed(small_server.address, requests[0])  # the first request builds what the process keeps
    before = server.memory_info().rss
    for head in requests * 3:
        answer, sent = send_until_closed(small_server.address, head)
        assert answer.startswith(b"HTTP/1.1 401") and b'"code":"unauthorized"' in answer, answer[:300]
        assert b"www-authenticate: Bearer" in answer and sent < 16 * 1024**2
    assert server.memory_info().rss - before < 16 * 1024**2


def test_json_bodies_are_capped_near_1_mb(client, auth, small_server):
    huge = client.post("/v1/jobs", json={"model_id": "mdl_x", "steps": [INT8] * 30_000}, headers=auth)  # 1.5 MB
    assert "MCS_MAX_JSON_BYTES" in error(huge, 413)["message"]
    head = f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n{auth_header(auth)}Content-Length: {2 * 1024**3}\r\n\r\n"
    answer, sent = send_until_closed(small_server.address, head)
    assert answer.startswith(b"HTTP/1.1 413") and sent < 16 * 1024**2


def test_a_body_that_stops_arriving_is_408(small_server, auth):
    head = f"POST /v1/models HTTP/1.1\r\nHost: x\r\n{auth_header(auth)}" \
           "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n"
    host, port = small_server.address.split(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode())
        answer = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 408") and b'"code":"request_timeout"' in answer, answer[:300]
    assert b"connection: close" in answer.lower() and time.monotonic() - started < 5
    assert leftovers() == []


def auth_header(auth: dict[str, str]) -> str:
    return f"Authorization: {auth['Authorization']}\r\n"


def test_rate_limit_is_per_key_with_retry_after(small_app, auth, other_auth):
    statuses = [small_app.get("/v1/models", headers=auth).status_code for _ in range(8)]
    assert statuses[:5] == [200] * 5 and statuses[-1] == 429
    limited = small_app.get("/v1/models", headers=auth)
    assert error(limited, 429)["code"] == "rate_limited" and 1 <= int(limited.headers["Retry-After"]) <= 2
    assert small_app.get("/v1/models", headers=other_auth).status_code == 200
    assert small_app.get("/healthz").status_code == 200


@pytest.mark.parametrize(("step", "field"), [
    ({"type": "explode"}, "body.steps.0"),
    ({"type": "decompose", "method": "svd", "rank": 0}, "rank"),
    ({"type": "decompose", "method": "svd", "rank": -1}, "rank"),
    ({"type": "decompose", "method": "svd", "rank": 10**9}, "rank"),
    ({"type": "prune", "method": "magnitude", "sparsity": 1.5}, "sparsity"),
    ({**INT8, "bits": 1}, "bits"),
    ({**INT8, "surprise": True}, "surprise"),
    ({**INT8, "targets": ["x" * 100_000]}, "targets"),  # a long pattern, still under MCS_MAX_JSON_BYTES
])
def test_bad_recipes_are_422_naming_the_field(client, auth, upload, step, field):
    model = upload()
    problem = error(client.post("/v1/jobs", json={"model_id": model["id"], "steps": [step]}, headers=auth), 422)
    assert any(field in p["field"] for p in problem["details"]), problem
    assert client.get("/v1/jobs", headers=auth).json()["total"] == 0


def test_unknown_top_level_fields_and_foreign_datasets(client, auth, other_auth, upload):
    model = upload()
    extra = client.post("/v1/jobs", json={"model_id": model["id"], "steps": [INT8], "priority": 9}, headers=auth)
    assert any(p["field"] == "body.priority" for p in error(extra, 422)["details"])
    theirs = client.post("/v1/datasets", files={"file": ("d.txt", b"hello world\n")}, headers=other_auth).json()
    step = {"type": "quantize", "method": "gptq", "calibration": {"dataset_id": theirs["id"]}}
    assert theirs["id"] in error(client.post("/v1/jobs", json={"model_id": model["id"], "steps": [step]},
                                             headers=auth), 404)["message"]


def test_concurrent_identical_requests_make_one_job(client, auth, upload):
    model = upload()
    body = {"model_id": model["id"], "steps": [INT8]}
    headers = {**auth, "Idempotency-Key": "same-request"}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: client.post("/v1/jobs", json=body, headers=headers), range(8)))
    assert {r.status_code for r in responses} <= {202, 409}
    assert len({r.json()["id"] for r in responses if r.status_code == 202}) == 1
    assert client.get("/v1/jobs", headers=auth).json()["total"] == 1


@pytest.fixture()
def finished(client, auth, upload, tmp_path) -> dict:
    """A job ended through the worker's repository calls, with a stored artifact."""
    model = upload()
    job_id = client.post("/v1/jobs", json={"model_id": model["id"], "steps": [INT8]}, headers=auth).json()["id"]
    payload = hashlib.sha256(b"seed").digest() * 5000
    (tmp_path / "a.zip").write_bytes(payload)
    key = f"artifacts/{job_id}/model.zip"
    get_store().put_file(key, tmp_path / "a.zip")
    with session_scope() as session:
        runs = JobRuns(session)
        job = runs.claim(job_id, timedelta(seconds=60), max_attempts=1)  # a run holds the job it ends
        runs.succeed(job, {}, {"name": "a.zip", "storage_key": key, "size_bytes": len(payload),
                               "sha256": hashlib.sha256(payload).hexdigest()})
    dataset = client.post("/v1/datasets", files={"file": ("d.txt", b"hello\n")}, headers=auth).json()
    job = client.get(f"/v1/jobs/{job_id}", headers=auth).json()
    return {"model": model["id"], "job": job_id, "artifact": job["artifacts"][0], "dataset": dataset["id"],
            "payload": payload}


def test_other_tenants_ids_are_404_on_every_route_and_never_listed(client, auth, other_auth, finished):
    routes = [("get", f"/v1/models/{finished['model']}"), ("delete", f"/v1/models/{finished['model']}"),
              ("get", f"/v1/jobs/{finished['job']}"), ("post", f"/v1/jobs/{finished['job']}/cancel"),
              ("get", f"/v1/datasets/{finished['dataset']}"), ("delete", f"/v1/datasets/{finished['dataset']}"),
              ("get", f"/v1/artifacts/{finished['artifact']['id']}")]
    for method, path in routes:
        assert error(getattr(client, method)(path, headers=other_auth), 404)["code"] == "not_found", path
    for listing in ("/v1/models", "/v1/jobs", "/v1/datasets"):
        assert client.get(listing, headers=other_auth).json() == {"items": [], "page": 1, "page_size": 20,
                                                                  "total": 0}
        assert client.get(listing, headers=auth).json()["total"] == 1
    ids = [finished["model"], finished["job"], finished["artifact"]["id"], finished["dataset"]]
    assert all(len(i.split("_", 1)[1]) == 24 for i in ids)  # 96 random bits: nothing to enumerate


def test_ranges_resume_and_bounds(client, auth, finished):
    url = f"/v1/artifacts/{finished['artifact']['id']}"
    first = client.get(url, headers={**auth, "Range": "bytes=0-49999"})
    rest = client.get(url, headers={**auth, "Range": f"bytes={len(first.content)}-"})
    resumed = first.content + rest.content
    assert (first.status_code, rest.status_code) == (206, 206)
    assert hashlib.sha256(resumed).hexdigest() == finished["artifact"]["sha256"] == first.headers["ETag"].strip('"')
    assert error(client.get(url, headers={**auth, "Range": "bytes=5-1"}), 416)["code"] == "range_not_satisfiable"
    started = time.monotonic()
    many = client.get(url, headers={**auth, "Range": "bytes=" + ",".join(f"{i}-{i}" for i in range(1000))})
    assert many.status_code in (200, 416, 422) and time.monotonic() - started < 2
    for listing in ("/v1/models", "/v1/jobs", "/v1/datasets"):
        assert client.get(f"{listing}?page_size=1000000", headers=auth).status_code == 422
