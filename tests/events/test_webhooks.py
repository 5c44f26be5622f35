"""Webhooks on a live stack: a receiver that fails twice gets the event on the third try, signed the Standard
Webhooks way (checked here as the README documents it, independently of the service's code)."""

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cli.stack import free_port
from tests.events.conftest import Live, submit

pytestmark = [pytest.mark.e2e]


def documented_check(secret: str, headers: dict[str, str], body: bytes, tolerance_s: float = 300) -> bool:
    """The README's receiver check."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    fresh = abs(time.time() - int(headers["webhook-timestamp"])) <= tolerance_s
    return fresh and any(hmac.compare_digest(expected, s) for s in headers["webhook-signature"].split())


class Receiver:
    """A local HTTP server that answers 500 to the first `failures` requests, then 204; it keeps every request."""

    def __init__(self, failures: int) -> None:
        self.failures, self.requests = failures, []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(500 if len(receiver.requests) <= receiver.failures else 204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count: int, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.requests) < count:
            assert time.monotonic() < deadline, self.requests
            time.sleep(0.1)


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    made = Receiver(failures=2)
    yield made
    made.server.shutdown()


def test_a_receiver_failing_twice_gets_the_event_on_the_third_try(live: Live, model_zip: bytes,
                                                                   receiver: Receiver) -> None:
    with live.client("hooks") as api:
        created = api.post("/v1/webhooks", json={"url": receiver.url, "events": ["done"]})
        assert created.status_code == 201, created.text
        hook = created.json()
        assert hook["secret"].startswith("whsec_") and hook["events"] == ["done"]
        assert "secret" not in api.get(f"/v1/webhooks/{hook['id']}").json()
        job_id = submit(api, model_zip)
        receiver.wait(3)
        time.sleep(0.5)  # the third attempt's record lands after its response
        log = api.get(f"/v1/webhooks/{hook['id']}/deliveries").json()

    assert len(receiver.requests) == 3
    assert len({headers["webhook-id"] for headers, _ in receiver.requests}) == 1  # one message, retried
    headers, body = receiver.requests[-1]
    payload = json.loads(body)
    assert payload["type"] == "done" and payload["data"]["job_id"] == job_id
    assert payload["data"]["status"] == "succeeded"
    assert documented_check(hook["secret"], headers, body)
    assert not documented_check(hook["secret"], headers, body.replace(b"succeeded", b"failed"))
    assert not documented_check("whsec_" + base64.b64encode(b"another key").decode(), headers, body)

    [delivery] = log["items"]
    assert delivery["id"] == headers["webhook-id"] and delivery["status"] == "succeeded"
    assert delivery["attempts"] == 3 and delivery["event_type"] == "done"
    assert [attempt["status_code"] for attempt in delivery["attempt_log"]] == [500, 500, 204]
    assert delivery["attempt_log"][0]["error"].startswith("HTTP 500")
