"""Presets over HTTP: listed with their export formats, and a job naming one gets the preset's steps and export
(the request's own `export` wins)."""

from api.schemas import JobCreate
from core.compression.presets import PRESETS


def test_presets_are_listed_with_their_steps_and_export(client, auth):
    response = client.get("/v1/presets", headers=auth)
    assert response.status_code == 200, response.text
    listed = {preset["name"]: preset for preset in response.json()}
    assert set(listed) == set(PRESETS)
    assert listed["gguf-q4"]["export"] == ["gguf"] and listed["w4a16-gptq"]["export"] == []
    assert listed["half-depth-distill"]["steps"][0]["student"] == {"fraction": 0.5}


def test_a_preset_job_gets_the_presets_export_unless_the_request_names_one():
    job = JobCreate.model_validate({"model_id": "mdl_1", "preset": "gguf-q8"})
    assert job.export == ["gguf"] and [step.method for step in job.steps] == ["rtn"]
    assert JobCreate.model_validate({"model_id": "mdl_1", "preset": "gguf-q8", "export": []}).export == []
    assert JobCreate.model_validate({"model_id": "mdl_1", "preset": "w8a16-rtn"}).export == []


def test_a_gguf_preset_job_carries_its_export_to_the_models_check(client, auth, upload):
    model = upload()  # a tiny BERT: GGUF writes Llama-family causal LMs only
    refused = client.post("/v1/jobs", json={"model_id": model["id"], "preset": "gguf-q8"}, headers=auth)
    assert refused.status_code == 422
    assert refused.json()["error"]["message"].startswith('export "gguf" writes Llama-family causal LMs')
    body = {"model_id": model["id"], "preset": "gguf-q8", "export": []}
    accepted = client.post("/v1/jobs", json=body, headers=auth)
    assert accepted.status_code == 202, accepted.text
    assert [step["config"] for step in accepted.json()["steps"]] == PRESETS["gguf-q8"].steps
