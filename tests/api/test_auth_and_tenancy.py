from cli.main import main
from tests.fixtures.api import api_key


def test_every_v1_route_needs_a_key(client):
    for method, path in [("get", "/v1/models"), ("get", "/v1/jobs"), ("get", "/v1/artifacts/art_x"),
                         ("post", "/v1/jobs")]:
        response = getattr(client, method)(path)
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "unauthorized"
    wrong = client.get("/v1/models", headers={"Authorization": "Bearer mcs_not-a-key"})
    assert wrong.status_code == 401 and "unknown" in wrong.json()["error"]["message"]
    assert wrong.headers["WWW-Authenticate"] == "Bearer"


def test_two_authorization_headers_are_400_not_first_one_wins(client, auth, other_auth):
    headers = [("Authorization", auth["Authorization"]), ("Authorization", other_auth["Authorization"])]
    response = client.get("/v1/models", headers=headers)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_request"


def test_keys_are_listed_and_revoked_by_prefix_or_value(client, capsys):
    first, second = api_key("carol"), api_key("carol")
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {first}"}).status_code == 200
    assert main(["keys", "list", "--tenant", "carol"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert sorted(line.split()[0] for line in listed) == sorted([first[:12], second[:12]])
    assert all(line.endswith("active") for line in listed)
    assert main(["keys", "revoke", first[:12]]) == 0 and main(["keys", "revoke", second]) == 0
    for key in (first, second):
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    assert main(["keys", "list", "--tenant", "carol"]) == 0
    assert all("revoked" in line for line in capsys.readouterr().out.splitlines())
    assert main(["keys", "revoke", first[:12]]) == 1  # nothing active left to revoke
    assert main(["keys", "list", "--tenant", "nobody"]) == 1


def test_other_tenants_rows_are_404_like_unknown_ids(client, auth, other_auth, upload):
    model = upload()
    job = client.post("/v1/jobs", json={"model_id": model["id"], "steps": [{"type": "quantize"}]}, headers=auth)
    job_id = job.json()["id"]
    unknown_model = client.get("/v1/models/mdl_000000000000000000000000", headers=other_auth)
    foreign_model = client.get(f"/v1/models/{model['id']}", headers=other_auth)
    assert foreign_model.status_code == unknown_model.status_code == 404
    assert foreign_model.json()["error"]["code"] == "not_found"
    assert client.get(f"/v1/jobs/{job_id}", headers=other_auth).status_code == 404
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=other_auth).status_code == 404
    assert client.delete(f"/v1/models/{model['id']}", headers=other_auth).status_code == 404
    steal = client.post("/v1/jobs", json={"model_id": model["id"], "steps": [{"type": "quantize"}]},
                        headers=other_auth)
    assert steal.status_code == 404
    assert client.get("/v1/models", headers=other_auth).json()["total"] == 0
    assert client.get("/v1/jobs", headers=other_auth).json()["total"] == 0
    assert client.get("/v1/models", headers=auth).json()["total"] == 1
