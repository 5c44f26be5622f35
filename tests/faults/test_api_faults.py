"""The API process SIGKILLed during an upload (no `finally`, no shutdown hook runs): no model row is written, the
body it was receiving dies with it, and the scratch folder it was filling is swept when an API starts again."""

import socket
import time
from pathlib import Path

import httpx
import psycopg
import pytest

pytestmark = [pytest.mark.faults, pytest.mark.slow]
BOUNDARY = "mcs-kill-test"
FILE_PART = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="m.zip"\r\n'
             "Content-Type: application/zip\r\n\r\n").encode()
END = f"\r\n--{BOUNDARY}--\r\n".encode()
MiB = 1 << 20


def start_upload(client: httpx.Client, file_bytes: int) -> socket.socket:
    """A multipart upload of `file_bytes` over a raw socket, so the test controls how fast its body arrives."""
    url = client.base_url
    sock = socket.create_connection((url.host, url.port))
    length = len(FILE_PART) + file_bytes + len(END)
    sock.sendall(f"POST /v1/models HTTP/1.1\r\nHost: {url.host}\r\nAuthorization: {client.headers['Authorization']}"
                 f"\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {length}\r\n\r\n"
                 .encode() + FILE_PART)
    return sock


def upload_scratch(stack) -> list[Path]:
    return sorted((Path(stack.env["MCS_ARTIFACT_DIR"]) / "tmp").glob("upload-*"))


def wait_until(condition, timeout_s: float = 60, every_s: float = 0.002) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every_s)


def model_rows(database_url: str) -> int:
    with psycopg.connect(database_url.replace("+psycopg", "")) as conn:
        return conn.execute("SELECT count(*) FROM models").fetchone()[0]


def test_api_killed_mid_upload_writes_no_row_and_its_scratch_is_swept(stack, postgres, tmp_path):
    services = stack(scratch_max_age_s="2")
    spool = tmp_path / "api-tmp"  # where the API spools form files (Starlette uses the system temp folder)
    spool.mkdir()
    services.env["TMPDIR"] = str(spool)

    # 1. Killed while the body is still arriving, slowly: what was spooled so far lived in an unnamed temp file.
    client = services.start_api()
    sock = start_upload(client, 64 * MiB)
    for _ in range(8):
        sock.sendall(b"\0" * MiB)
        time.sleep(0.05)
    services.processes["api"].kill()
    services.processes["api"].wait()
    sock.close()
    assert list(spool.iterdir()) == [] and upload_scratch(services) == []

    # 2. Killed after the whole body arrived, while the route copies the file into its scratch folder.
    client = services.start_api()
    sock = start_upload(client, 256 * MiB)
    for _ in range(256):
        sock.sendall(b"\0" * MiB)
    sock.sendall(END)
    wait_until(lambda: upload_scratch(services) != [])
    services.processes["api"].kill()
    services.processes["api"].wait()
    sock.close()
    assert upload_scratch(services) != [], "the partial copy outlives a killed process"

    # The next API process to start sweeps scratch untouched for MCS_SCRATCH_MAX_AGE_S (2 s here).
    time.sleep(2.5)
    client = services.start_api()
    assert upload_scratch(services) == []
    assert model_rows(postgres.url) == 0 and client.get("/v1/models").json()["total"] == 0
    assert not (Path(services.env["MCS_ARTIFACT_DIR"]) / "models").exists()
