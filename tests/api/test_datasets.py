import json

import pytest

from core.errors import NotFound
from core.service.datasets import read_texts
from core.service.db.repositories import Datasets, Models, Tenants
from core.service.db.session import session_scope
from core.service.jobs import check_references
from core.service.storage import get_store

INT8 = {"type": "quantize"}


def post_dataset(client, auth, payload: bytes, filename: str = "data.jsonl", **form):
    return client.post("/v1/datasets", files={"file": (filename, payload, "application/octet-stream")},
                       data=form, headers=auth)


def test_jsonl_and_text_uploads_are_stored_normalised(client, auth):
    rows = [{"text": "first sample", "label": "pos"}, {"text": "second"}]
    jsonl = post_dataset(client, auth, "\n".join(json.dumps(r) for r in rows).encode() + b"\n\n")
    assert jsonl.status_code == 201, jsonl.text
    body = jsonl.json()
    assert body["id"].startswith("dst_") and body["format"] == "jsonl" and body["num_samples"] == 2
    stored = get_store().local_file(f"datasets/{body['id']}/data.jsonl")
    assert read_texts(stored) == ["first sample", "second"]
    text = post_dataset(client, auth, "één\ntwo\n".encode(), "notes.txt", name="notes")
    assert text.status_code == 201 and text.json()["format"] == "text" and text.json()["name"] == "notes"
    assert client.get("/v1/datasets", headers=auth).json()["total"] == 2


def test_bad_datasets_get_clear_4xx(client, auth):
    cases = [
        (b"", 400, "empty"),
        (b"\n \n", 400, "no samples"),
        (b"ok line\n\xff\xfe bad\n", 400, "line 2 is not valid UTF-8"),
        (b'{"text": "a"}\n{"body": "b"}\n', 400, 'line 2 must be a JSON object with a non-empty string field "text"'),
        (b'{"text": "a"}\n{oops\n', 400, "line 2 is not valid JSON"),
    ]
    for payload, status, message in cases:
        response = post_dataset(client, auth, payload, "d.jsonl" if payload.startswith(b"{") else "d.txt")
        assert response.status_code == status, (payload, response.text)
        assert message in response.json()["error"]["message"]
    assert client.get("/v1/datasets", headers=auth).json()["total"] == 0


def test_dataset_over_the_cap_is_413(client, auth, monkeypatch):
    from core.service.settings import get_settings

    monkeypatch.setattr(get_settings(), "max_dataset_bytes", 100)
    response = post_dataset(client, auth, b"x" * 101, "d.txt")
    assert response.status_code == 413 and "100 bytes" in response.json()["error"]["message"]


def test_step_references_must_be_the_tenants_own(client, auth, other_auth, upload):
    """Any `dataset_id` (and `teacher` model id) anywhere in a recipe is checked at submission."""
    foreign = post_dataset(client, other_auth, b"some text\n", "d.txt").json()
    mine = post_dataset(client, auth, b"some text\n", "d.txt").json()
    model = upload()
    with session_scope() as session:
        alice = Tenants(session).get_or_create("alice").id
        datasets, models = Datasets(session, alice), Models(session, alice)
        check_references({"steps": [{"calibration": {"dataset_id": mine["id"]}}, {"teacher": model["id"]}]},
                          datasets, models)
        with pytest.raises(NotFound, match=foreign["id"]):
            check_references({"steps": [{"calibration": {"dataset_id": foreign["id"]}}]}, datasets, models)
        with pytest.raises(NotFound, match="mdl_nope"):
            check_references({"steps": [{"teacher": "mdl_nope"}]}, datasets, models)


def test_other_tenant_cannot_see_or_delete_a_dataset(client, auth, other_auth):
    dataset = post_dataset(client, auth, b"text\n", "d.txt").json()
    assert client.get(f"/v1/datasets/{dataset['id']}", headers=other_auth).status_code == 404
    assert client.delete(f"/v1/datasets/{dataset['id']}", headers=other_auth).status_code == 404
    assert client.delete(f"/v1/datasets/{dataset['id']}", headers=auth).status_code == 204
    assert client.get(f"/v1/datasets/{dataset['id']}", headers=auth).status_code == 404


def test_training_step_on_a_one_row_dataset_is_refused_at_submission(client, auth, upload):
    tiny = post_dataset(client, auth, b"only one line\n", "d.txt").json()
    model = upload()
    body = {"model_id": model["id"], "steps": [{"type": "distill", "dataset_id": tiny["id"]}]}
    response = client.post("/v1/jobs", json=body, headers=auth)
    assert response.status_code == 422, response.text
    assert "has 1 sample(s)" in response.json()["error"]["message"]
    assert client.get("/v1/jobs", headers=auth).json()["total"] == 0


@pytest.mark.parametrize(("line", "message"), [
    (b'{"text": "a", "label": ' + b"9" * 5000 + b"}", "line 2 is not valid JSON: Exceeds the limit (4300 digits)"),
    (b'{"text": "a", "label": -' + b"1" * 4301 + b"}", "line 2 is not valid JSON"),
    (b'{"text": "a", "extra": [' + b"7" * 10_000 + b"]}", "line 2 is not valid JSON"),
    (b'{"text": "\\ud800"}', "line 2 holds a lone UTF-16 surrogate ('\\ud800')"),
    (b'{"text": "tail \\udfff"}', "line 2 holds a lone UTF-16 surrogate"),
    (b'{"text": "\\ude00\\ud83d"}', "line 2 holds a lone UTF-16 surrogate"),
    (b'{"text": "a", "label": "\\udc80"}', "line 2 holds a lone UTF-16 surrogate"),
])
def test_huge_integers_and_lone_surrogates_are_400(client, auth, line, message):
    response = post_dataset(client, auth, b'{"text": "fine"}\n' + line + b"\n")
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_request"
    assert message in response.json()["error"]["message"] and response.json()["error"]["details"] == {"line": 2}
    assert client.get("/v1/datasets", headers=auth).json()["total"] == 0


def test_surrogate_pairs_and_long_but_allowed_integers_are_stored(client, auth):
    payload = b'{"text": "smile \\ud83d\\ude00", "label": ' + b"9" * 4000 + b"}\n"
    response = post_dataset(client, auth, payload)
    assert response.status_code == 201, response.text
    stored = get_store().local_file(f"datasets/{response.json()['id']}/data.jsonl")
    assert read_texts(stored) == ["smile \U0001F600"]
