"""API keys through the real API: scopes, expiry, the admin routes (list, create, revoke, rotate), the `mcs keys`
commands, the migration of keys made before scopes, and a revocation seen by a second API process (uvicorn)."""

import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import text, update

from cli.main import main
from cli.stack import free_port, spawn, wait_ready
from core.service.db.migrate import downgrade, upgrade
from core.service.db.models import ApiKey
from core.service.db.repositories import Tenants
from core.service.db.session import make_engine, session_scope


def key_with(tenant: str, *scopes: str, expires_at: datetime | None = None) -> str:
    from core.service import keys

    with session_scope() as session:
        tenant_id = Tenants(session).get_or_create(tenant).id
        return keys.create_key(session, tenant_id, scopes, expires_at)[1]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture()
def admin(db: str) -> dict[str, str]:
    return bearer(key_with("alice", "admin"))


def test_a_read_key_reads_but_cannot_submit_upload_or_delete(client, auth, upload):
    model = upload()
    read = bearer(key_with("alice", "read"))
    assert client.get("/v1/models", headers=read).json()["total"] == 1
    assert client.get(f"/v1/models/{model['id']}", headers=read).status_code == 200
    refused = [
        client.post("/v1/jobs", json={"model_id": model["id"], "steps": [{"type": "quantize"}]}, headers=read),
        client.delete(f"/v1/models/{model['id']}", headers=read),
        client.post("/v1/models", files={"file": ("m.zip", b"PK", "application/zip")}, headers=read),
    ]
    for response in refused:
        assert response.status_code == 403, response.text
        error = response.json()["error"]
        assert error["code"] == "insufficient_scope" and "`write` scope" in error["message"]
        assert error["details"] == {"required_scope": "write", "scopes": ["read"]}
        assert 'scope="write"' in response.headers["WWW-Authenticate"]
    assert client.get("/v1/models", headers=auth).json()["total"] == 1  # nothing was deleted


def test_admin_routes_need_the_admin_scope(client, auth, admin):
    response = client.get("/v1/admin/keys", headers=auth)  # a read+write key, as every key was before scopes
    assert response.status_code == 403
    assert response.json()["error"]["details"] == {"required_scope": "admin", "scopes": ["read", "write"]}
    assert client.get("/v1/admin/keys", headers=admin).status_code == 200


def test_admin_creates_lists_and_revokes_its_tenants_keys(client, admin, other_auth):
    created = client.post("/v1/admin/keys", json={"name": "ci", "scopes": ["read"]}, headers=admin)
    assert created.status_code == 201, created.text
    new = created.json()
    assert new["scopes"] == ["read"] and new["name"] == "ci" and new["key"].startswith(new["prefix"])
    assert client.get("/v1/models", headers=bearer(new["key"])).status_code == 200
    listed = client.get("/v1/admin/keys", headers=admin).json()
    assert new["id"] in [k["id"] for k in listed] and all("key" not in k for k in listed)
    assert client.post("/v1/admin/keys", json={"scopes": ["root"]}, headers=admin).status_code == 422

    revoked = client.post(f"/v1/admin/keys/{new['id']}/revoke", headers=admin)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    refused = client.get("/v1/models", headers=bearer(new["key"]))
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    assert client.post(f"/v1/admin/keys/{new['id']}/revoke", headers=admin).status_code == 409

    mallory_admin = bearer(key_with("mallory", "admin"))  # another tenant's admin sees none of alice's keys
    assert client.post(f"/v1/admin/keys/{listed[0]['id']}/revoke", headers=mallory_admin).status_code == 404
    assert client.get(f"/v1/admin/keys/{listed[0]['id']}", headers=mallory_admin).status_code == 404


def test_rotate_replaces_a_key_now_or_after_a_grace_period(client, admin):
    old = client.post("/v1/admin/keys", json={"scopes": ["write"], "name": "deploy"}, headers=admin).json()
    rotated = client.post(f"/v1/admin/keys/{old['id']}/rotate", headers=admin)  # no body: revoke the old one now
    assert rotated.status_code == 201, rotated.text
    new = rotated.json()
    assert new["id"] != old["id"] and new["scopes"] == ["read", "write"] and new["name"] == "deploy"
    assert client.get("/v1/models", headers=bearer(new["key"])).status_code == 200
    assert client.get("/v1/models", headers=bearer(old["key"])).status_code == 401
    assert client.post(f"/v1/admin/keys/{old['id']}/rotate", json={}, headers=admin).status_code == 409

    rolled = client.post(f"/v1/admin/keys/{new['id']}/rotate", json={"grace_s": 3600}, headers=admin).json()
    assert client.get("/v1/models", headers=bearer(new["key"])).status_code == 200  # still in its grace period
    assert client.get("/v1/models", headers=bearer(rolled["key"])).status_code == 200
    lapses = datetime.fromisoformat(client.get(f"/v1/admin/keys/{new['id']}", headers=admin).json()["expires_at"])
    assert timedelta(minutes=59) < lapses - datetime.now(UTC) <= timedelta(hours=1)


def test_an_expired_key_is_refused_and_says_so(client, admin):
    soon = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    made = client.post("/v1/admin/keys", json={"expires_at": soon}, headers=admin).json()
    assert client.get("/v1/models", headers=bearer(made["key"])).status_code == 200
    with session_scope() as session:  # let a day pass for this key
        session.execute(update(ApiKey).where(ApiKey.id == made["id"])
                        .values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    refused = client.get("/v1/models", headers=bearer(made["key"]))
    assert refused.status_code == 401 and "expired" in refused.json()["error"]["message"]
    past = client.post("/v1/admin/keys", json={"expires_at": "2020-01-01T00:00:00Z"}, headers=admin)
    assert past.status_code == 400 and past.json()["error"]["details"]["field"] == "expires_at"
    naive = client.post("/v1/admin/keys", json={"expires_at": "2099-01-01T00:00:00"}, headers=admin)
    assert naive.status_code == 422


def test_mcs_keys_create_list_rotate_and_revoke(client, capsys):
    assert main(["keys", "create", "--tenant", "dora", "--scope", "read", "--expires-in", "30d",
                 "--name", "dashboards"]) == 0
    key = capsys.readouterr().out.strip()
    assert client.get("/v1/models", headers=bearer(key)).status_code == 200
    assert client.post("/v1/jobs", json={}, headers=bearer(key)).status_code == 403
    assert main(["keys", "list", "--tenant", "dora"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(key[:12]) and " read " in line and "expires " in line and line.endswith("active")
    assert "'dashboards'" in line

    assert main(["keys", "rotate", key[:12]]) == 0
    rotated = capsys.readouterr().out.strip()
    assert client.get("/v1/models", headers=bearer(key)).status_code == 401
    assert client.get("/v1/models", headers=bearer(rotated)).status_code == 200
    key_id = next(word for word in _listing(capsys, "dora")[0].split() if word.startswith("key_"))
    assert main(["keys", "revoke", key_id]) == 0
    capsys.readouterr()
    assert client.get("/v1/models", headers=bearer(rotated)).status_code == 401
    assert all(" revoked " in line for line in _listing(capsys, "dora"))
    assert main(["keys", "rotate", key_id]) == 1  # nothing active to rotate


def _listing(capsys: pytest.CaptureFixture[str], tenant: str) -> list[str]:
    assert main(["keys", "list", "--tenant", tenant]) == 0
    return capsys.readouterr().out.strip().splitlines()


def test_mcs_keys_create_refuses_a_bad_duration():
    with pytest.raises(SystemExit) as exited:
        main(["keys", "create", "--tenant", "dora", "--expires-in", "soon"])
    assert exited.value.code == 2


@pytest.fixture()
def second_api(db: str, tmp_path) -> Iterator[httpx.Client]:
    """Another API process, a real uvicorn, on the suite's database."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = spawn([sys.executable, "-m", "cli.main", "serve", "--port", str(port)], env, tmp_path / "api.log")
    try:
        wait_ready(f"http://127.0.0.1:{port}", [process])
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as api:
            yield api
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_revoked_key_is_refused_by_another_api_process_at_its_next_request(client, admin, second_api):
    key = client.post("/v1/admin/keys", json={"scopes": ["read"]}, headers=admin).json()
    for _ in range(3):  # warm: whatever it might remember, it has seen this key succeed
        assert second_api.get("/v1/models", headers=bearer(key["key"])).status_code == 200
    assert client.post(f"/v1/admin/keys/{key['id']}/revoke", headers=admin).status_code == 200
    refused = second_api.get("/v1/models", headers=bearer(key["key"]))
    assert refused.status_code == 401, refused.text


def test_keys_made_before_scopes_keep_read_and_write(database_url, db):
    """Migration 0007 on a key row written under 0006: it gets read+write, so existing clients keep working."""
    downgrade(database_url, "0006")
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO tenants (id, name, created_at) VALUES ('ten_old', 'old', now())"))
            conn.execute(text("INSERT INTO api_keys (id, tenant_id, key_hash, prefix, created_at) "
                              "VALUES ('key_old', 'ten_old', :hash, 'mcs_oldkey00', now())"),
                         {"hash": "0" * 64})
    finally:
        upgrade(database_url)
    with engine.connect() as conn:
        scopes = conn.execute(text("SELECT scopes FROM api_keys WHERE id = 'key_old'")).scalar_one()
    engine.dispose()
    assert scopes == ["read", "write"]
