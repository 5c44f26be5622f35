"""Registering webhooks in process: addresses that are not public are refused (SSRF), a tenant sees only its own
webhooks, and the signature helpers agree with the documented check."""

import pytest
from fastapi.testclient import TestClient

from core.service.webhooks import sign, verify
from tests.events.test_webhooks import documented_check


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/hook", "http://localhost/hook", "http://10.1.2.3/hook", "http://192.168.0.10/hook",
    "http://169.254.169.254/latest/meta-data", "http://[::1]/hook", "http://[::ffff:127.0.0.1]/hook",
    "http://0.0.0.0/hook", "ftp://example.com/hook", "not a url",
])
def test_urls_to_private_addresses_are_refused(client: TestClient, auth: dict[str, str], url: str) -> None:
    response = client.post("/v1/webhooks", json={"url": url, "events": ["done"]}, headers=auth)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "unsafe_url"
    assert client.get("/v1/webhooks", headers=auth).json()["total"] == 0


def test_webhooks_belong_to_their_tenant(client: TestClient, auth: dict[str, str],
                                         other_auth: dict[str, str]) -> None:
    created = client.post("/v1/webhooks", json={"url": "http://93.184.216.34/hook", "events": ["done", "progress"]},
                          headers=auth)
    assert created.status_code == 201, created.text
    hook_id = created.json()["id"]
    assert client.get(f"/v1/webhooks/{hook_id}", headers=other_auth).status_code == 404
    assert client.get(f"/v1/webhooks/{hook_id}/deliveries", headers=other_auth).status_code == 404
    assert client.delete(f"/v1/webhooks/{hook_id}", headers=other_auth).status_code == 404
    assert client.get("/v1/webhooks", headers=other_auth).json()["total"] == 0
    assert client.get(f"/v1/webhooks/{hook_id}", headers=auth).json()["events"] == ["done", "progress"]
    assert client.delete(f"/v1/webhooks/{hook_id}", headers=auth).status_code == 204
    assert client.get(f"/v1/webhooks/{hook_id}", headers=auth).status_code == 404


def test_unknown_event_types_are_a_422(client: TestClient, auth: dict[str, str]) -> None:
    response = client.post("/v1/webhooks", json={"url": "http://93.184.216.34/", "events": ["finished"]},
                           headers=auth)
    assert response.status_code == 422 and "events" in response.text


def test_the_service_signature_passes_the_documented_check() -> None:
    import time

    secret, body = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", b'{"type":"done"}'
    now = int(time.time())
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now),
               "webhook-signature": sign(secret, "msg_1", now, body)}
    assert documented_check(secret, headers, body) and verify(secret, headers, body)
    assert not verify(secret, headers, body + b" ") and not documented_check(secret, headers, body + b" ")
    stale = {**headers, "webhook-timestamp": str(now - 3600),
             "webhook-signature": sign(secret, "msg_1", now - 3600, body)}
    assert not verify(secret, stale, body)
