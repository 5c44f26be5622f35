def test_every_v1_route_needs_a_key(client):
    for method, path in [("get", "/v1/models"), ("get", "/v1/jobs"), ("get", "/v1/artifacts/art_x"),
                         ("post", "/v1/jobs")]:
        response = getattr(client, method)(path)
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "unauthorized"
    wrong = client.get("/v1/models", headers={"Authorization": "Bearer mcs_not-a-key"})
    assert wrong.status_code == 401 and "unknown" in wrong.json()["error"]["message"]


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
